"""The configurations of the EfficientNet encoder (Stage B's image condition) and the previewer."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from stable_cascade.specs.base import ConfigBase


@dataclasses.dataclass(frozen=True)
class EffNetConfig(ConfigBase):
    """The EfficientNetV2-S encoder of Stage B's image condition (original ``EfficientNetEncoder``).

    ``stage_channels`` / ``stage_depths`` are the output widths and block counts of the six stages
    (three FusedMBConv, three MBConv); the stem has ``stage_channels[0]`` channels. The defaults are
    torchvision's ``efficientnet_v2_s``; smaller values give a test-size encoder of the same structure.
    """

    diffusers_class_name: ClassVar[str] = "EfficientNetEncoder"

    c_latent: int = 16
    stage_channels: tuple[int, ...] = (24, 48, 64, 128, 160, 256)
    stage_depths: tuple[int, ...] = (2, 4, 4, 6, 9, 15)
    head_channels: int = 1280

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("stage_channels", "stage_depths"):
            value = getattr(self, name)
            if len(value) != 6 or any(v < 1 for v in value):
                raise ValueError(f"{name} needs six positive entries (one per stage), got {value}")
        if self.c_latent < 1 or self.head_channels < 1:
            raise ValueError(
                f"c_latent and head_channels must be positive, got {self.c_latent} and {self.head_channels}"
            )


@dataclasses.dataclass(frozen=True)
class PreviewerConfig(ConfigBase):
    """The latent previewer of Stage C (original ``Previewer``): 16-channel latents → RGB at ×8."""

    diffusers_class_name: ClassVar[str] = "Previewer"

    c_in: int = 16
    c_hidden: int = 512
    c_out: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.c_in, self.c_out) < 1 or self.c_hidden < 4 or self.c_hidden % 4:
            raise ValueError(
                "c_in and c_out must be positive and c_hidden a positive multiple of 4, got "
                f"c_in={self.c_in}, c_hidden={self.c_hidden}, c_out={self.c_out}"
            )


#: The released encoder (torchvision's EfficientNetV2-S) and the demo cascade's small one.
EFFNET_VARIANTS: dict[str, EffNetConfig] = {
    "effnet": EffNetConfig(),
    "demo_effnet": EffNetConfig(
        stage_channels=(16, 24, 32, 48, 64, 96), stage_depths=(1, 1, 1, 1, 1, 1), head_channels=128
    ),
}

#: The released previewer (``previewer.safetensors``) and the demo cascade's small one (3×3 latents
#: of 128×128 images → 24×24 previews).
PREVIEWER_VARIANTS: dict[str, PreviewerConfig] = {
    "previewer": PreviewerConfig(),
    "demo_previewer": PreviewerConfig(c_hidden=96),
}
