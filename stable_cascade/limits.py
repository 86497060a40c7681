"""Bounds on model config values, checked before anything is built.

A typo in a ``config.json`` or ``--init-config`` (a negative width, 10⁶ layers, a NaN scale) should
stop with a message naming the field, not allocate terabytes or build a model that outputs NaN.
The bounds are generous: every released and test model sits far inside them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

MAX_CHANNELS = 65_536
MAX_LEVELS = 8
MAX_BLOCKS = 256


@dataclasses.dataclass(frozen=True)
class Bound:
    """``low <= value <= high`` for a number, or for every entry of a tuple of numbers."""

    low: float
    high: float
    integer: bool = True
    low_open: bool = False  # ``low < value`` instead


_CHANNELS = Bound(1, MAX_CHANNELS)
_BLOCKS = Bound(1, MAX_BLOCKS)
_LAYERS = Bound(0, MAX_BLOCKS)  # a UNet level may have no layers (diffusers builds and runs it)
_POSITIVE = Bound(0, math.inf, integer=False, low_open=True)

#: Field name → bound, for every config class (the same name means the same kind of value).
BOUNDS: dict[str, Bound] = {
    # UNet (Stage B / Stage C)
    "in_channels": _CHANNELS,
    "out_channels": _CHANNELS,
    "timestep_ratio_embedding_dim": _CHANNELS,
    "patch_size": Bound(1, 64),
    "conditioning_dim": _CHANNELS,
    "block_out_channels": _CHANNELS,
    # num_attention_heads: checked per level by UNetConfig (any value on levels without attention)
    "down_num_layers_per_block": _LAYERS,
    "up_num_layers_per_block": _LAYERS,
    "down_blocks_repeat_mappers": _LAYERS,  # 0 runs a level once, as 1 does (as in diffusers)
    "up_blocks_repeat_mappers": _LAYERS,
    "clip_text_in_channels": _CHANNELS,
    "clip_text_pooled_in_channels": _CHANNELS,
    "clip_image_in_channels": _CHANNELS,
    "clip_seq": Bound(1, 1024),
    "effnet_in_channels": _CHANNELS,
    "pixel_mapper_in_channels": _CHANNELS,
    "kernel_size": Bound(1, 63),
    "dropout": Bound(0, 1, integer=False),
    # Stage A
    "up_down_scale_factor": Bound(1, 16),
    "levels": Bound(1, MAX_LEVELS),
    "bottleneck_blocks": Bound(0, MAX_BLOCKS),
    "embed_dim": _CHANNELS,
    "latent_channels": _CHANNELS,
    "num_vq_embeddings": Bound(1, 2**24),
    "scale_factor": _POSITIVE,
    # Scheduler
    "scaler": _POSITIVE,
    "s": _POSITIVE,
    # EfficientNet encoder, previewer
    "c_latent": _CHANNELS,
    "stage_channels": _CHANNELS,
    "stage_depths": _BLOCKS,
    "head_channels": _CHANNELS,
    "c_in": _CHANNELS,
    "c_hidden": _CHANNELS,
    "c_out": _CHANNELS,
}

#: Per-level fields: at most MAX_LEVELS entries.
LEVEL_FIELDS = frozenset({"block_out_channels"})


def check_limits(owner: str, values: Mapping[str, Any]) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``owner.field`` for the first value out of its bound."""
    for name, value in values.items():
        bound = BOUNDS.get(name)
        if bound is None or value is None:
            continue
        entries = value if isinstance(value, tuple) else (value,)
        if name in LEVEL_FIELDS and not 1 <= len(entries) <= MAX_LEVELS:
            raise ValueError(
                f"{owner}.{name} has {len(entries)} levels; between 1 and {MAX_LEVELS} are supported"
            )
        for entry in entries:
            _check_entry(f"{owner}.{name}", entry, bound)


def _check_entry(field: str, value: Any, bound: Bound) -> None:
    kind = "whole number" if bound.integer else "number"
    number = int if bound.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        raise TypeError(f"{field} must be a {kind} (or a list of them), got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
    too_low = value <= bound.low if bound.low_open else value < bound.low
    if too_low or value > bound.high:
        low = f"greater than {bound.low:g}" if bound.low_open else f"at least {bound.low:g}"
        high = "" if math.isinf(bound.high) else f" and at most {bound.high:g}"
        raise ValueError(
            f"{field} must be {low}{high}, got {value!r}; fix the config (the upper limits only catch typos "
            "and sit far above every released model)"
        )
