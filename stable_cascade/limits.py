"""Bounds on model config values, checked before anything is built, and on a generation's size and
steps (shared by the pipelines, the CLI and the server).

A typo in a ``config.json`` or ``--init-config`` (a negative width, 10⁶ layers, a NaN scale) should
stop with a message naming the field, not allocate terabytes or build a model that outputs NaN.
The bounds are generous: every released and test model sits far inside them. Likewise a height of
10⁶ pixels or 10⁹ steps stops with one line instead of running until killed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

MAX_CHANNELS = 65_536
MAX_LEVELS = 8
MAX_BLOCKS = 256

# A generation: image sides are multiples of SIZE_MULTIPLE pixels, at most MAX_SIDE per side and
# MAX_PIXELS per image; at most MAX_STEPS sampling steps per stage and MAX_IMAGES images (prompts ×
# images per prompt) in one pipeline call.
SIZE_MULTIPLE = 8
MAX_SIDE = 8192
MAX_PIXELS = 4096 * 4096
MAX_STEPS = 1000
MAX_IMAGES = 4096
#: The largest seed: torch generators take 64-bit seeds, and every image's seed must be one.
MAX_SEED = 2**63 - 1


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

#: transformers model configs (the CLIP text and image encoders), checked before transformers builds
#: the model: a ``vocab_size`` of 10⁹ or 200,000 layers would allocate for minutes.
TRANSFORMERS_BOUNDS: dict[str, Bound] = {
    "vocab_size": Bound(1, 1_048_576),
    "hidden_size": _CHANNELS,
    "intermediate_size": Bound(1, 4 * MAX_CHANNELS),
    "num_hidden_layers": _BLOCKS,
    "num_attention_heads": _CHANNELS,
    "max_position_embeddings": Bound(1, 65_536),
    "projection_dim": _CHANNELS,
    "image_size": Bound(1, 8192),
    "patch_size": Bound(1, 1024),
    "num_channels": Bound(1, 64),
}


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


def check_transformers_config(config: Mapping[str, Any], source: str) -> None:
    """Raise ``TypeError``/``ValueError`` naming ``source`` for the first value of a transformers
    ``config.json`` (or of its ``text_config``/``vision_config``) out of :data:`TRANSFORMERS_BOUNDS`."""
    parts = [(source, config)] + [
        (f"{source} {name}", config[name])
        for name in ("text_config", "vision_config")
        if isinstance(config.get(name), Mapping)
    ]
    for owner, values in parts:
        for name, bound in TRANSFORMERS_BOUNDS.items():
            if values.get(name) is not None:
                _check_entry(f"{owner}: {name}", values[name], bound)
        hidden, heads = values.get("hidden_size"), values.get("num_attention_heads")
        if isinstance(hidden, int) and isinstance(heads, int) and hidden % heads:
            raise ValueError(
                f"{owner}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}"
            )


def _check_entry(field: str, value: Any, bound: Bound) -> None:
    kind = "whole number" if bound.integer else "number"
    number = int if bound.integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, number):
        raise TypeError(f"{field} must be a {kind} (or a list of them), got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{field} must be finite, got {value!r}")
    too_low = value <= bound.low if bound.low_open else value < bound.low
    if too_low or value > bound.high:
        low = f"greater than {_number(bound.low)}" if bound.low_open else f"at least {_number(bound.low)}"
        high = "" if math.isinf(bound.high) else f" and at most {_number(bound.high)}"
        raise ValueError(
            f"{field} must be {low}{high}, got {value!r}; fix the config (the upper limits only catch typos "
            "and sit far above every released model)"
        )


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
