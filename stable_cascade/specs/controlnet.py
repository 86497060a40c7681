"""The Stage C ControlNet's configuration (original ``modules/controlnet.py``), as data."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from stable_cascade.specs.base import ConfigBase

ControlNetBackbone = Literal["effnet", "large", "simple"]
ControlType = Literal["canny", "inpainting", "super_resolution"]
#: The released ControlNets feed these ResBlock calls of the 3.6B Stage C (64 calls in all).
RELEASED_PROJ_BLOCKS = (0, 4, 8, 12, 51, 55, 59, 63)


@dataclasses.dataclass(frozen=True)
class ControlNetConfig(ConfigBase):
    """A Stage C ControlNet: a backbone turns the control input into ``embedding_channels`` features,
    one projection per entry of ``proj_blocks`` maps them to ``out_channels`` (Stage C's width).

    Backbones: ``effnet`` (EfficientNetV2-S ``features``; the ``effnet_*`` fields size it, its head
    gives ``embedding_channels``), ``large`` (1×1 convs ``in → large_hidden_channels →
    large_channels``, ``large_blocks`` residual blocks, 1×1 → ``embedding_channels``) and ``simple``
    (two 3×3 convs; ``embedding_channels`` equals ``in_channels``). ``control_type`` names the
    preprocessing the ControlNet was trained with, when known.
    """

    diffusers_class_name: ClassVar[str] = "ControlNet"

    backbone: ControlNetBackbone = "effnet"
    in_channels: int = 3
    out_channels: int = 2048
    embedding_channels: int = 1280
    proj_blocks: tuple[int, ...] = RELEASED_PROJ_BLOCKS
    effnet_stage_channels: tuple[int, ...] = (24, 48, 64, 128, 160, 256)
    effnet_stage_depths: tuple[int, ...] = (2, 4, 4, 6, 9, 15)
    large_hidden_channels: int = 16384
    large_channels: int = 1024
    large_blocks: int = 8
    control_type: ControlType | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.backbone not in ("effnet", "large", "simple"):
            raise ValueError(f"backbone must be 'effnet', 'large' or 'simple', got {self.backbone!r}")
        if self.control_type not in (None, "canny", "inpainting", "super_resolution"):
            raise ValueError(
                "control_type must be None, 'canny', 'inpainting' or 'super_resolution', "
                f"got {self.control_type!r}"
            )
        blocks = self.proj_blocks
        if not blocks or min(blocks) < 0 or len(set(blocks)) != len(blocks):
            raise ValueError(f"proj_blocks must be distinct ResBlock call indices >= 0, got {blocks}")
        if self.backbone == "simple" and self.embedding_channels != self.in_channels:
            raise ValueError(
                "the simple backbone keeps the input width: embedding_channels must equal in_channels, "
                f"got {self.embedding_channels} and {self.in_channels}"
            )
        sizes = (self.in_channels, self.out_channels, self.embedding_channels, self.large_hidden_channels)
        if min(sizes) < 1 or self.large_channels < 1 or self.large_blocks < 0:
            raise ValueError(f"channel counts must be positive, got {self}")


#: The three released files (``controlnet/*.safetensors`` of stabilityai/stable-cascade).
CONTROLNET_VARIANTS: dict[str, ControlNetConfig] = {
    "canny": ControlNetConfig(in_channels=1, control_type="canny"),
    "inpainting": ControlNetConfig(in_channels=4, control_type="inpainting"),
    "super_resolution": ControlNetConfig(backbone="large", in_channels=16, control_type="super_resolution"),
}
