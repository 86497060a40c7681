"""Model and scheduler configurations as data.

Each configuration is a frozen dataclass whose field names, meanings and defaults are those of the
matching diffusers constructor, so a diffusers ``config.json`` maps onto it one to one. The released
variants (and tiny ones for tests) are entries of :data:`UNET_VARIANTS`, derived from each other
with :func:`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import logging
from enum import Enum
from typing import Any, ClassVar, Literal, get_args

from stable_cascade.specs.base import ConfigBase
from stable_cascade.specs.encoders import EFFNET_VARIANTS as EFFNET_VARIANTS
from stable_cascade.specs.encoders import PREVIEWER_VARIANTS as PREVIEWER_VARIANTS
from stable_cascade.specs.encoders import EffNetConfig as EffNetConfig
from stable_cascade.specs.encoders import PreviewerConfig as PreviewerConfig

logger = logging.getLogger(__name__)

#: ``sca`` and ``crp`` (the released models'); ``guidance``: the CFG scale of an LCM-distilled stage
#: trained with a guidance embedding (``stable-cascade train lcm --full --guidance-embedding``).
TimestepCondition = Literal["sca", "crp", "guidance"]


class BlockType(str, Enum):
    """The block kinds of a UNet level; values are the class names diffusers writes to config.json."""

    RES = "SDCascadeResBlock"
    TIMESTEP = "SDCascadeTimestepBlock"
    ATTENTION = "SDCascadeAttnBlock"


_CTA = (BlockType.RES, BlockType.TIMESTEP, BlockType.ATTENTION)
_CT = (BlockType.RES, BlockType.TIMESTEP)


@dataclasses.dataclass(frozen=True)
class UNetConfig(ConfigBase):
    """Constructor arguments of the Stage B / Stage C UNet (diffusers ``StableCascadeUNet``)."""

    diffusers_class_name: ClassVar[str] = "StableCascadeUNet"

    in_channels: int = 16
    out_channels: int = 16
    timestep_ratio_embedding_dim: int = 64
    patch_size: int = 1
    conditioning_dim: int = 2048
    block_out_channels: tuple[int, ...] = (2048, 2048)
    num_attention_heads: tuple[int, ...] = (32, 32)
    down_num_layers_per_block: tuple[int, ...] = (8, 24)
    up_num_layers_per_block: tuple[int, ...] = (24, 8)
    down_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    up_blocks_repeat_mappers: tuple[int, ...] | None = (1, 1)
    block_types_per_layer: tuple[tuple[BlockType, ...], ...] = (_CTA, _CTA)
    clip_text_in_channels: int | None = None
    clip_text_pooled_in_channels: int = 1280
    clip_image_in_channels: int | None = None
    clip_seq: int = 4
    effnet_in_channels: int | None = None
    pixel_mapper_in_channels: int | None = None
    kernel_size: int = 3
    # One value for all levels (as diffusers allows) is expanded to one per level of block_out_channels
    # and saved as given; dropout left out is 0.1 on every level (saved as the expanded list).
    dropout: tuple[float, ...] = None  # type: ignore[assignment]
    self_attn: tuple[bool, ...] = True  # type: ignore[assignment]
    timestep_conditioning_type: tuple[TimestepCondition, ...] = ("sca", "crp")
    switch_level: tuple[bool, ...] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        levels = len(self.block_out_channels)
        try:
            types = tuple(tuple(BlockType(t) for t in level) for level in self.block_types_per_layer)
        except ValueError as error:
            valid = ", ".join(t.value for t in BlockType)
            raise ValueError(f"block_types_per_layer: {error}; valid block types: {valid}") from error
        object.__setattr__(self, "block_types_per_layer", types)
        uniform: dict[str, Any] = {}  # the fields given as one value for all levels, as given
        if self.dropout is None or isinstance(self.dropout, (int, float)):
            uniform["dropout"] = self.dropout
            object.__setattr__(
                self, "dropout", (0.1 if self.dropout is None else float(self.dropout),) * levels
            )
        if isinstance(self.self_attn, bool):
            uniform["self_attn"] = self.self_attn
            object.__setattr__(self, "self_attn", (self.self_attn,) * levels)
        object.__setattr__(self, "_uniform", uniform)
        per_level: dict[str, tuple[Any, ...] | None] = {
            "num_attention_heads": self.num_attention_heads,
            "down_num_layers_per_block": self.down_num_layers_per_block,
            "up_num_layers_per_block": self.up_num_layers_per_block,
            "down_blocks_repeat_mappers": self.down_blocks_repeat_mappers,
            "up_blocks_repeat_mappers": self.up_blocks_repeat_mappers,
            "block_types_per_layer": self.block_types_per_layer,
            "dropout": self.dropout,
            "self_attn": self.self_attn,
        }
        for name, value in per_level.items():
            if value is not None and len(value) != levels:
                raise ValueError(
                    f"{name} has {len(value)} entries but block_out_channels has {levels} levels; "
                    "give one entry per level"
                )
        if self.switch_level is not None and len(self.switch_level) != levels - 1:
            raise ValueError(f"switch_level needs {levels - 1} entries (one per level transition)")
        for cond in self.timestep_conditioning_type:
            if cond not in get_args(TimestepCondition):
                raise ValueError(
                    f"timestep_conditioning_type entries must be 'sca', 'crp' or 'guidance', got {cond!r}"
                )
        for level, (width, heads, level_types) in enumerate(
            zip(self.block_out_channels, self.num_attention_heads, types, strict=True)
        ):
            _check_heads(level, width, heads, BlockType.ATTENTION in level_types)

    def to_dict(self) -> dict[str, Any]:
        """diffusers' ``config.json``: ``dropout`` and ``self_attn`` saved as given (one value or a list)."""
        uniform = {k: v for k, v in self.__dict__["_uniform"].items() if v is not None}
        return {**super().to_dict(), **uniform}

    def replace(self, **changes: Any) -> UNetConfig:
        """A copy with ``changes``; values given for all levels follow a new ``block_out_channels``."""
        kept = {k: v for k, v in self.__dict__["_uniform"].items() if k not in changes}
        return super().replace(**kept, **changes)

    @property
    def is_stage_b(self) -> bool:
        """Stage B (the decoder) is recognised by its EfficientNet mapper."""
        return self.effnet_in_channels is not None

    def repeats(self, direction: Literal["down", "up"]) -> tuple[int, ...]:
        """How many times each level's block list runs, in ``block_out_channels`` order."""
        levels = len(self.block_out_channels)
        mappers = self.down_blocks_repeat_mappers if direction == "down" else self.up_blocks_repeat_mappers
        if mappers is None:
            return (1,) * levels
        runs = tuple(max(1, m) for m in mappers)  # 0 mappers run the level once, as 1 does
        # diffusers stores the up-path repeats deepest level first.
        return runs if direction == "down" else runs[::-1]


def _check_heads(level: int, width: int, heads: Any, attention: bool) -> None:
    """Heads of a level with attention: 1 to ``width`` (diffusers' head width is ``width // heads``, so
    heads need not divide the width); any whole number elsewhere (diffusers' configs use ``-1``)."""
    if heads is None and not attention:
        return
    if isinstance(heads, bool) or not isinstance(heads, int):
        raise TypeError(
            f"UNetConfig.num_attention_heads must be whole numbers, got {heads!r} for level {level}"
        )
    if attention and not 1 <= heads <= width:
        raise ValueError(
            f"level {level} has attention blocks, so its num_attention_heads must be between 1 and its "
            f"{width} channels, got {heads}; use -1 only on levels without attention"
        )


@dataclasses.dataclass(frozen=True)
class VQConfig(ConfigBase):
    """Constructor arguments of Stage A (diffusers ``PaellaVQModel``)."""

    diffusers_class_name: ClassVar[str] = "PaellaVQModel"

    in_channels: int = 3
    out_channels: int = 3
    up_down_scale_factor: int = 2
    levels: int = 2
    bottleneck_blocks: int = 12
    embed_dim: int = 384
    latent_channels: int = 4
    num_vq_embeddings: int = 8192
    scale_factor: float = 0.3764


@dataclasses.dataclass(frozen=True)
class SchedulerConfig(ConfigBase):
    """Constructor arguments of diffusers ``DDPMWuerstchenScheduler``."""

    diffusers_class_name: ClassVar[str] = "DDPMWuerstchenScheduler"

    scaler: float = 1.0
    s: float = 0.008


_PRIOR = UNetConfig(
    clip_text_in_channels=1280,
    clip_image_in_channels=768,
    dropout=(0.1, 0.1),
    switch_level=(False,),
)
_DECODER = UNetConfig(
    in_channels=4,
    out_channels=4,
    patch_size=2,
    conditioning_dim=1280,
    block_out_channels=(320, 640, 1280, 1280),
    num_attention_heads=(0, 0, 20, 20),
    down_num_layers_per_block=(2, 6, 28, 6),
    up_num_layers_per_block=(6, 28, 6, 2),
    down_blocks_repeat_mappers=(1, 1, 1, 1),
    up_blocks_repeat_mappers=(3, 3, 2, 2),
    block_types_per_layer=(_CT, _CT, _CTA, _CTA),
    effnet_in_channels=16,
    pixel_mapper_in_channels=3,
    dropout=(0.0, 0.0, 0.1, 0.1),
    timestep_conditioning_type=("sca",),
)

UNetVariant = Literal[
    "prior",
    "prior_lite",
    "decoder",
    "decoder_lite",
    "tiny_prior",
    "tiny_decoder",
    "demo_prior",
    "demo_decoder",
]

#: The released UNets (names as the subfolders of the diffusers hub repos), tiny test sizes and the demo.
UNET_VARIANTS: dict[str, UNetConfig] = {
    "prior": _PRIOR,
    "prior_lite": _PRIOR.replace(
        conditioning_dim=1536,
        block_out_channels=(1536, 1536),
        num_attention_heads=(24, 24),
        down_num_layers_per_block=(4, 12),
        up_num_layers_per_block=(12, 4),
    ),
    "decoder": _DECODER,
    "decoder_lite": _DECODER.replace(
        block_out_channels=(320, 576, 1152, 1152),
        num_attention_heads=(0, 9, 18, 18),
        down_num_layers_per_block=(2, 4, 14, 4),
        up_num_layers_per_block=(4, 14, 4, 2),
        up_blocks_repeat_mappers=(2, 2, 2, 2),
    ),
    "tiny_prior": _PRIOR.replace(
        conditioning_dim=32,
        block_out_channels=(32, 32),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        clip_text_in_channels=24,
        clip_text_pooled_in_channels=24,
        clip_image_in_channels=16,
        clip_seq=2,
    ),
    "tiny_decoder": _DECODER.replace(
        conditioning_dim=32,
        block_out_channels=(16, 32, 32, 32),
        num_attention_heads=(0, 0, 2, 2),
        down_num_layers_per_block=(1, 1, 1, 1),
        up_num_layers_per_block=(1, 1, 1, 1),
        up_blocks_repeat_mappers=(2, 2, 1, 1),
        clip_text_pooled_in_channels=24,
        clip_seq=2,
        effnet_in_channels=16,
    ),
    # The demo cascade shipped with the package (128² images, a 3×3 Stage C latent, 32×32 Stage B).
    "demo_prior": _PRIOR.replace(
        conditioning_dim=128,
        block_out_channels=(192, 192),
        num_attention_heads=(4, 4),
        down_num_layers_per_block=(2, 2),
        up_num_layers_per_block=(2, 2),
        clip_text_in_channels=128,
        clip_text_pooled_in_channels=128,
        clip_image_in_channels=None,
        dropout=(0.0, 0.0),
    ),
    "demo_decoder": _DECODER.replace(
        conditioning_dim=128,
        block_out_channels=(48, 96, 192),
        num_attention_heads=(0, 0, 4),
        down_num_layers_per_block=(1, 2, 2),
        up_num_layers_per_block=(2, 2, 1),
        down_blocks_repeat_mappers=(1, 1, 1),
        up_blocks_repeat_mappers=(1, 1, 1),
        block_types_per_layer=(_CT, _CT, _CTA),
        clip_text_pooled_in_channels=128,
        dropout=(0.0, 0.0, 0.0),
        self_attn=(True, True, True),
    ),
}

VQ_VARIANTS: dict[str, VQConfig] = {
    "vqgan": VQConfig(),
    "tiny_vqgan": VQConfig(bottleneck_blocks=2, embed_dim=32, num_vq_embeddings=64),
    "demo_vqgan": VQConfig(bottleneck_blocks=2, embed_dim=48, num_vq_embeddings=256),
}


def unet_variant(name: str) -> UNetConfig:
    """The config of a named UNet variant, with an error listing the valid names."""
    try:
        return UNET_VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown UNet variant {name!r}; choose one of: {', '.join(UNET_VARIANTS)}"
        ) from None
