"""Architecture inference: the config of a UNet or Stage A from tensor names and shapes alone.

Works on the original and the diffusers layout, on real tensors, ``meta`` tensors or plain shapes,
so fine-tunes and small models of the Stable Cascade family load without a ``config.json``.

What the weights cannot tell is filled in by rule, chosen so that the released models come out
exactly as their diffusers configs: when the inferred structure equals an entry of
:data:`~stable_cascade.specs.UNET_VARIANTS` (all fields but ``num_attention_heads`` and
``dropout``), that entry is returned; otherwise levels with attention get head dim 64
(``width // 64`` heads; one head when the width is not a multiple of 64) and dropout 0.1, and levels
without attention get 0 heads and dropout 0.0. ``self_attn`` is True and ``switch_level`` is
``[False]`` per transition for ``UpDownBlock2d`` resamplers (Stage C), as in every released model.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import torch

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert.keys import is_original_unet_layout, unet_original_to_diffusers
from stable_cascade.specs import UNET_VARIANTS, BlockType, TimestepCondition, UNetConfig, VQConfig

#: A tensor, or just its shape: what inference and detection need.
ShapeLike = torch.Tensor | torch.Size | Sequence[int]
Shapes = dict[str, tuple[int, ...]]

#: The latent scale of the original Stage A single file (``enc(x) / 0.43``, ``dec(z * 0.43)``).
ORIGINAL_STAGE_A_SCALE = 0.43
HEAD_DIM = 64  # of every released attention level
ATTENTION_DROPOUT = 0.1

_BLOCK = re.compile(r"^(down|up)_blocks\.(\d+)\.(\d+)\.(.+)$")
_REPEAT = re.compile(r"^(down|up)_repeat_mappers\.(\d+)\.(\d+)\.weight$")
_T_COND = re.compile(r"\.mapper_(\w+)\.weight$")
_T_CONDS: tuple[TimestepCondition, ...] = ("sca", "crp", "guidance")  # canonical order (the original's)


def shapes_of(state_dict: Mapping[str, ShapeLike]) -> Shapes:
    """Key → shape tuple, from tensors or shapes."""
    return {k: tuple(v.shape) if isinstance(v, torch.Tensor) else tuple(v) for k, v in state_dict.items()}


def _diffusers_shapes(state_dict: Mapping[str, ShapeLike]) -> Shapes:
    shapes = shapes_of(state_dict)
    if not is_original_unet_layout(shapes):
        return shapes
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return shapes_of(unet_original_to_diffusers(meta))


def _require(shapes: Shapes, key: str, what: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"cannot infer the UNet architecture: {key} ({what}) is missing")
    return shapes[key]


def _block_kind(rest: str) -> BlockType | None:
    """The block a tensor belongs to, from its name inside the block."""
    if rest.startswith(("attention.", "kv_mapper.")):
        return BlockType.ATTENTION
    if rest.startswith(("depthwise.", "channelwise.")):
        return BlockType.RES
    if rest.startswith("mapper"):  # mapper.* and mapper_<cond>.*
        return BlockType.TIMESTEP
    return None


def _block_width(kind: BlockType, prefix: str, shapes: Shapes) -> int:
    if kind is BlockType.RES:
        return _require(shapes, f"{prefix}depthwise.weight", "ResBlock depthwise conv")[0]
    if kind is BlockType.TIMESTEP:
        return _require(shapes, f"{prefix}mapper.weight", "TimestepBlock mapper")[0] // 2
    return _require(shapes, f"{prefix}kv_mapper.1.weight", "AttnBlock kv mapper")[0]


def _level_blocks(shapes: Shapes) -> dict[tuple[str, int], list[BlockType]]:
    """(direction, module index) → block types in order, checking the indices are contiguous."""
    found: dict[tuple[str, int], dict[int, BlockType]] = {}
    for key in shapes:
        if not (match := _BLOCK.match(key)):
            continue
        direction, level, index, rest = (
            match.group(1),
            int(match.group(2)),
            int(match.group(3)),
            match.group(4),
        )
        kind = _block_kind(rest)
        if kind is None:
            raise CheckpointError(
                f"{key} belongs to no known UNet block (ResBlock, TimestepBlock, AttnBlock)"
            )
        if found.setdefault((direction, level), {}).setdefault(index, kind) is not kind:
            raise CheckpointError(f"{key}: block {direction}_blocks.{level}.{index} mixes block types")
    levels: dict[tuple[str, int], list[BlockType]] = {}
    for where, blocks in found.items():
        if sorted(blocks) != list(range(len(blocks))):
            raise CheckpointError(f"{where[0]}_blocks.{where[1]} has gaps in its block indices")
        levels[where] = [blocks[i] for i in range(len(blocks))]
    return levels


def _pattern(down: list[BlockType], up: list[BlockType], level: int) -> tuple[BlockType, ...]:
    """The shortest block-type unit whose repetition gives both the down and the up block list."""
    source = down or up
    for size in range(1, len(source) + 1):
        unit = source[:size]
        if all(len(s) % size == 0 and s == unit * (len(s) // size) for s in (down, up)):
            return tuple(unit)
    raise CheckpointError(
        f"level {level}: the down blocks {[t.name for t in down]} and up blocks {[t.name for t in up]} "
        "are not repetitions of one block-type unit"
    )


class _Level(NamedTuple):
    width: int
    unit: tuple[BlockType, ...]  # block types of one layer
    down_layers: int
    up_layers: int


def _levels(shapes: Shapes) -> list[_Level]:
    """Every level, shallow to deep."""
    blocks = _level_blocks(shapes)
    if not blocks:
        raise CheckpointError("cannot infer the UNet architecture: no down_blocks/up_blocks tensors")
    count = 1 + max(index for _, index in blocks)
    result = []
    for level in range(count):
        down, up = blocks.get(("down", level), []), blocks.get(("up", count - 1 - level), [])
        if not (down or up):
            raise CheckpointError(f"level {level} has neither down nor up blocks")
        unit = _pattern(down, up, level)
        prefixes = [f"down_blocks.{level}.{j}." for j in range(len(down))]
        prefixes += [f"up_blocks.{count - 1 - level}.{j}." for j in range(len(up))]
        kinds = down + up
        widths = {_block_width(kind, prefix, shapes) for kind, prefix in zip(kinds, prefixes, strict=True)}
        if len(widths) != 1:
            raise CheckpointError(f"level {level} has blocks of different widths {sorted(widths)}")
        result.append(_Level(widths.pop(), unit, len(down) // len(unit), len(up) // len(unit)))
    return result


def _repeat_mappers(shapes: Shapes, levels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Repeat counts (mappers + 1), down in level order and up deepest first (diffusers' orders)."""
    counts = {"down": [1] * levels, "up": [1] * levels}
    for key in shapes:
        if match := _REPEAT.match(key):
            direction, level, j = match.group(1), int(match.group(2)), int(match.group(3))
            if level >= levels:
                raise CheckpointError(f"{key}: there are only {levels} levels")
            counts[direction][level] = max(counts[direction][level], j + 2)
    return tuple(counts["down"]), tuple(counts["up"])


def _timestep_conditions(shapes: Shapes) -> tuple[TimestepCondition, ...]:
    names = {
        m.group(1)
        for k in shapes
        if k.startswith(("down_blocks.", "up_blocks.")) and (m := _T_COND.search(k))
    }
    unknown = names - set(_T_CONDS)
    if unknown:
        raise CheckpointError(
            f"unknown timestep conditions {sorted(unknown)}; only 'sca', 'crp' and 'guidance' exist"
        )
    return tuple(c for c in _T_CONDS if c in names)


def _conditioning_dim(shapes: Shapes, pooled_out: int) -> int:
    """c_cond: the kv mappers' input, else the text mapper's output, else pooled output / 4 (clip_seq 4)."""
    for key, shape in shapes.items():
        if key.endswith(".kv_mapper.1.weight"):
            return shape[1]
    if "clip_txt_mapper.weight" in shapes:
        return shapes["clip_txt_mapper.weight"][0]
    return pooled_out // 4


def _heads(width: int, unit: tuple[BlockType, ...]) -> int:
    if BlockType.ATTENTION not in unit:
        return 0
    return width // HEAD_DIM if width % HEAD_DIM == 0 else 1


def _channels(shapes: Shapes, patch: int) -> tuple[int, int]:
    """(in_channels, out_channels) from the embedding and output convs: c·p² each."""
    c_in = _require(shapes, "embedding.1.weight", "input embedding conv")[1]
    c_out = _require(shapes, "clf.1.weight", "output conv")[0]
    if c_in % patch**2 or c_out % patch**2:
        raise CheckpointError(
            f"embedding/clf channels {c_in}/{c_out} are not multiples of patch² = {patch**2}"
        )
    return c_in // patch**2, c_out // patch**2


def infer_unet_config(state_dict: Mapping[str, ShapeLike]) -> UNetConfig:
    """The :class:`UNetConfig` of a Stage B / Stage C state dict (either layout), from shapes alone.

    Stage B is recognised by its EfficientNet mapper and uses patch size 2; Stage C uses 1.
    """
    shapes = _diffusers_shapes(state_dict)
    levels = _levels(shapes)
    pooled_out, pooled_in = _require(shapes, "clip_txt_pooled_mapper.weight", "pooled text mapper")
    c_cond = _conditioning_dim(shapes, pooled_out)
    if c_cond <= 0 or pooled_out % c_cond:
        raise CheckpointError(f"pooled text mapper output {pooled_out} is not a multiple of c_cond {c_cond}")
    effnet = shapes.get("effnet_mapper.0.weight")
    pixels = shapes.get("pixels_mapper.0.weight")
    text, image = shapes.get("clip_txt_mapper.weight"), shapes.get("clip_img_mapper.weight")
    in_channels, out_channels = _channels(shapes, patch := 2 if effnet else 1)
    down_repeats, up_repeats = _repeat_mappers(shapes, len(levels))
    timestep = next((s[1] for k, s in shapes.items() if k.endswith(".mapper.weight")), 64)
    kernel = next((s[-1] for k, s in shapes.items() if k.endswith(".depthwise.weight")), 3)
    switch = "down_downscalers.1.1.blocks.0.weight" in shapes
    try:
        config = UNetConfig(
            in_channels=in_channels,
            out_channels=out_channels,
            timestep_ratio_embedding_dim=timestep,
            patch_size=patch,
            conditioning_dim=c_cond,
            block_out_channels=tuple(level.width for level in levels),
            num_attention_heads=tuple(_heads(level.width, level.unit) for level in levels),
            down_num_layers_per_block=tuple(level.down_layers for level in levels),
            up_num_layers_per_block=tuple(level.up_layers for level in reversed(levels)),
            down_blocks_repeat_mappers=down_repeats,
            up_blocks_repeat_mappers=up_repeats,
            block_types_per_layer=tuple(level.unit for level in levels),
            clip_text_in_channels=text[1] if text else None,
            clip_text_pooled_in_channels=pooled_in,
            clip_image_in_channels=image[1] if image else None,
            clip_seq=pooled_out // c_cond,
            effnet_in_channels=effnet[1] if effnet else None,
            pixel_mapper_in_channels=pixels[1] if pixels else None,
            kernel_size=kernel,
            dropout=tuple(ATTENTION_DROPOUT if BlockType.ATTENTION in lv.unit else 0.0 for lv in levels),
            self_attn=(True,) * len(levels),
            timestep_conditioning_type=_timestep_conditions(shapes),
            switch_level=(False,) * (len(levels) - 1) if switch else None,
        )
    except ValueError as error:
        raise CheckpointError(f"the tensors describe no valid UNet: {error}") from error
    return released_unet_config(config)


def released_unet_config(config: UNetConfig) -> UNetConfig:
    """The :data:`UNET_VARIANTS` entry with the same structure (heads and dropout aside), else ``config``."""
    for variant in UNET_VARIANTS.values():
        if _structure(variant) == _structure(config):
            return variant
    return config


def _structure(config: UNetConfig) -> dict[str, object]:
    """Every field the weights determine (all but the heads and dropout)."""
    fields = (f.name for f in dataclasses.fields(config))
    return {k: getattr(config, k) for k in fields if k not in ("num_attention_heads", "dropout")}


def infer_vq_config(
    state_dict: Mapping[str, ShapeLike], scale_factor: float = ORIGINAL_STAGE_A_SCALE
) -> VQConfig:
    """The :class:`VQConfig` of a Stage A state dict (either layout), from shapes alone.

    Images are assumed RGB, which fixes the pixel-(un)shuffle factor from the in/out convs;
    ``scale_factor`` is not stored in the weights: the original single file's 0.43 by default.
    """
    shapes = shapes_of(state_dict)
    codebook = shapes.get("vquantizer.codebook.weight") or shapes.get("vquantizer.embedding.weight")
    if codebook is None:
        raise CheckpointError("cannot infer the Stage A architecture: the vquantizer codebook is missing")
    if (
        "in_block.1.weight" not in shapes
        or "out_block.0.weight" not in shapes
        or "up_blocks.0.0.weight" not in shapes
    ):
        raise CheckpointError(
            "cannot infer the Stage A architecture: in_block/out_block/up_blocks.0 convs missing"
        )
    c0, in_pixels = shapes["in_block.1.weight"][:2]
    out_pixels = shapes["out_block.0.weight"][0]
    factor = math.isqrt(in_pixels // 3)
    if in_pixels != 3 * factor**2 or out_pixels != 3 * factor**2:
        raise CheckpointError(f"in/out convs with {in_pixels}/{out_pixels} channels do not fit RGB images")
    embed_dim, latent_channels = shapes["up_blocks.0.0.weight"][:2]
    down_blocks = sum(1 for k in shapes if re.fullmatch(r"down_blocks\.\d+\.gammas", k))
    up_blocks = sum(1 for k in shapes if re.fullmatch(r"up_blocks\.\d+\.gammas", k))
    if c0 * 2 ** (down_blocks - 1) != embed_dim:
        raise CheckpointError(
            f"Stage A widths do not double per level: {c0} at the input, {embed_dim} after "
            f"{down_blocks} levels"
        )
    return VQConfig(
        in_channels=3,
        out_channels=3,
        up_down_scale_factor=factor,
        levels=down_blocks,
        bottleneck_blocks=up_blocks - (down_blocks - 1),
        embed_dim=embed_dim,
        latent_channels=latent_channels,
        num_vq_embeddings=codebook[0],
        scale_factor=scale_factor,
    )
