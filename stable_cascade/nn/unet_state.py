"""The UNet's output type, its step-invariant cache and the ControlNet residuals it carries.

ControlNet residuals follow the original Stage C: entry ``k`` of the list is added (resized,
bilinear with ``align_corners=True``) to the hidden state just before the ``k``-th ResBlock call,
counting calls over the down path (shallow level first) then the up path (deep level first), block
repeats included; ``None`` entries and calls past the end of the list add nothing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from stable_cascade.nn.layers import BlockState, resize_like
from stable_cascade.specs import BlockType, UNetConfig

LevelStates = tuple[BlockState, ...]  # one entry per block of a level
Residuals = tuple[torch.Tensor | None, ...]  # one entry per ResBlock call


@dataclasses.dataclass
class StableCascadeUNetOutput:
    sample: torch.Tensor  # (B, out_channels, H, W)


@dataclasses.dataclass(frozen=True)
class UNetCache:
    """The step-invariant part of the forward pass for one generation (``StableCascadeUNet.prepare``).

    Valid for samples of ``batch`` rows and spatial ``size`` only; with classifier-free guidance it
    is built for the doubled ``[cond; uncond]`` batch the UNet is called on.
    """

    batch: int
    size: tuple[int, int]  # (H, W) of the sample
    added: tuple[torch.Tensor, ...]  # (B, c0, H/p, W/p) each: Stage B's effnet, pixels mapper outputs
    down: tuple[LevelStates, ...]  # per down level (shallow first)
    up: tuple[LevelStates, ...]  # per up level (deep first)
    # ControlNet residuals per level (down shallow first, up deep first), one entry per ResBlock call
    # of the level; empty without a ControlNet (``check_residuals``).
    control_down: tuple[Residuals, ...] = ()
    control_up: tuple[Residuals, ...] = ()


def added_conditioning(
    unet: nn.Module,
    effnet: Tensor | None,
    pixels: Tensor | None,
    batch: int,
    size: tuple[int, int],
    like: Tensor,
) -> tuple[Tensor, ...]:
    """Stage B: what is added to the embedded sample (B, c0, *size), in order: effnet, pixels (each
    through the UNet's mapper; zeros for missing pixels, as the reference)."""
    added: list[Tensor] = []
    if effnet is not None:
        added.append(unet.get_submodule("effnet_mapper")(resize_like(effnet, size)))  # interpolate, then map
    if (pixel_channels := cast(UNetConfig, unet.config).pixel_mapper_in_channels) is not None:
        if pixels is None:
            pixels = like.new_zeros(batch, pixel_channels, 8, 8)
        added.append(resize_like(unet.get_submodule("pixels_mapper")(pixels), size))  # map, then interpolate
    return tuple(added)


def resblock_widths(cfg: UNetConfig) -> list[tuple[str, int, int]]:
    """(direction, level, width) of every ResBlock call in the order the forward pass makes them."""
    levels = range(len(cfg.block_out_channels))
    calls: list[tuple[str, int, int]] = []
    for direction, order, layers in (
        ("down", levels, cfg.down_num_layers_per_block),
        ("up", reversed(levels), cfg.up_num_layers_per_block[::-1]),
    ):
        repeats = cfg.repeats(direction)  # type: ignore[arg-type]
        for level in order:
            per_pass = layers[level] * cfg.block_types_per_layer[level].count(BlockType.RES)
            calls += [(direction, level, cfg.block_out_channels[level])] * (repeats[level] * per_pass)
    return calls


def check_residuals(
    cfg: UNetConfig, residuals: Sequence[torch.Tensor | None], batch: int
) -> tuple[tuple[Residuals, ...], tuple[Residuals, ...]]:
    """Validated residuals split per level of the down and the up path, padded with ``None``.

    A residual may have the sample's batch, or a batch that divides it: it is then tiled, so the
    control of a batch of B prompts serves both halves of a ``[cond; uncond]`` batch of 2B.
    """
    calls = resblock_widths(cfg)
    if len(residuals) > len(calls):
        raise ValueError(
            f"got {len(residuals)} ControlNet residuals but this UNet makes only {len(calls)} ResBlock "
            "calls; is the ControlNet meant for another model (the released ones fit the 3.6B Stage C)?"
        )
    checked: list[torch.Tensor | None] = []
    for k, (residual, (direction, level, width)) in enumerate(zip(residuals, calls, strict=False)):
        if residual is not None:
            if residual.ndim != 4 or residual.shape[1] != width:
                raise ValueError(
                    f"ControlNet residual {k} (before a ResBlock of {direction} level {level}) must have "
                    f"shape (B, {width}, h, w), got {tuple(residual.shape)}; the ControlNet's "
                    "out_channels must equal the UNet's width"
                )
            if batch % residual.shape[0]:
                raise ValueError(
                    f"ControlNet residual {k} has batch {residual.shape[0]}, which does not divide the "
                    f"sample batch {batch}; give one control per prompt"
                )
            if residual.shape[0] != batch:
                residual = residual.repeat(batch // residual.shape[0], 1, 1, 1)
        checked.append(residual)
    checked += [None] * (len(calls) - len(checked))
    per_level: dict[tuple[str, int], list[torch.Tensor | None]] = {}
    for residual, (direction, level, _) in zip(checked, calls, strict=True):
        per_level.setdefault((direction, level), []).append(residual)
    levels = len(cfg.block_out_channels)
    down = tuple(tuple(per_level.get(("down", i), ())) for i in range(levels))
    up = tuple(tuple(per_level.get(("up", i), ())) for i in reversed(range(levels)))
    return down, up
