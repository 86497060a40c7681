"""Every configuration diffusers' ``StableCascadeUNet`` builds and runs, ours builds, loads strictly
and matches numerically: a seeded generator of small random configs, each checked against diffusers'
own class on identical random weights and inputs.

The generator covers what diffusers accepts: any number of attention heads (``-1`` included) on
levels without attention, heads that do not divide the width, block types in any order (repeated,
or none), zero layers, ``block_repeats`` through both repeat-mapper lists, ``switch_level`` (absent
or per transition), ``self_attn`` and ``dropout`` as one value or a list, present or absent
effnet/pixel mappers, both, one or no timestep conditions, odd kernel sizes, patch sizes 1–2 and
odd sample sizes. Left out on purpose: a text mapper without an image mapper (diffusers then never
reads the text tokens; ours does, which the demo prior relies on).
"""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from diffusers import StableCascadeUNet as DiffusersUNet

from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import BlockType

RES, TIME, ATTN = (t.value for t in BlockType)
FAST_CONFIGS = 60
SLOW_CONFIGS = 600


def random_config(rng: random.Random) -> dict[str, Any]:
    """A small diffusers ``StableCascadeUNet`` config drawn from everything its constructor accepts."""
    levels = rng.randint(1, 4)
    widths = [rng.choice((4, 6, 8, 12, 16)) for _ in range(levels)]
    types, heads = [], []
    for width in widths:
        level = rng.choice(
            [
                [RES, TIME, ATTN],
                [RES, TIME],
                [RES, ATTN],
                [ATTN, RES, TIME],
                [TIME, RES],
                [RES],
                [ATTN],
                [RES, RES, ATTN, TIME, ATTN],
                [],
            ]
        )
        types.append(level)
        if ATTN in level:
            heads.append(rng.choice([h for h in range(1, width + 1) if h <= 4]))
        else:
            heads.append(rng.choice((-1, 0, 1, 7, 32)))
    conds = rng.choice([["sca", "crp"], ["sca"], ["crp"], [], ["crp", "sca"]])
    image = rng.random() < 0.4
    config: dict[str, Any] = {
        "in_channels": rng.randint(1, 5),
        "out_channels": rng.randint(1, 5),
        "timestep_ratio_embedding_dim": rng.choice((8, 9, 16)),
        "patch_size": rng.choice((1, 2)),
        "conditioning_dim": rng.choice((4, 8, 12)),
        "block_out_channels": widths,
        "num_attention_heads": heads,
        "down_num_layers_per_block": [rng.choice((0, 1, 1, 2)) for _ in widths],
        "up_num_layers_per_block": [rng.choice((0, 1, 1, 2)) for _ in widths],
        "down_blocks_repeat_mappers": [rng.choice((0, 1, 1, 2)) for _ in widths],
        "up_blocks_repeat_mappers": [rng.choice((1, 2, 3)) for _ in widths],
        "block_types_per_layer": types,
        "clip_text_in_channels": rng.choice((5, 8)) if image else None,
        "clip_text_pooled_in_channels": rng.choice((3, 8)),
        "clip_image_in_channels": rng.choice((4, 6)) if image else None,
        "clip_seq": rng.randint(1, 4),
        "effnet_in_channels": rng.choice((None, 2, 16)),
        "pixel_mapper_in_channels": rng.choice((None, 3, 2)),
        "kernel_size": rng.choice((1, 3, 5)),
        "dropout": rng.choice((0.1, [rng.choice((0.0, 0.1)) for _ in widths])),
        "self_attn": rng.choice((True, False, [rng.random() < 0.5 for _ in widths])),
        "timestep_conditioning_type": conds,
        "switch_level": rng.choice((None, [rng.random() < 0.5 for _ in widths[1:]])),
    }
    return config


def random_inputs(config: dict[str, Any], rng: random.Random, seed: int) -> dict[str, Any]:
    """Inputs diffusers' forward accepts for ``config`` (batch 1: its ``sca``/``crp`` handling needs it)."""
    g = torch.Generator().manual_seed(seed)
    levels = len(config["block_out_channels"])
    patch = config["patch_size"]
    halvings = levels - 1 if config["switch_level"] is None else sum(config["switch_level"])
    low = patch * 2**halvings
    h, w = (rng.randint(low, low + 5) * patch for _ in range(2))  # odd sizes included
    inputs: dict[str, Any] = {
        "sample": torch.randn(1, config["in_channels"], h, w, generator=g),
        "timestep_ratio": torch.rand(1, generator=g),
        "clip_text_pooled": torch.randn(1, 1, config["clip_text_pooled_in_channels"], generator=g),
    }
    if config["clip_text_in_channels"] is not None:
        inputs["clip_text"] = torch.randn(1, rng.randint(1, 5), config["clip_text_in_channels"], generator=g)
        inputs["clip_img"] = torch.randn(1, rng.randint(1, 2), config["clip_image_in_channels"], generator=g)
    if config["effnet_in_channels"] is not None:
        size = (rng.randint(1, 6), rng.randint(1, 6))
        inputs["effnet"] = torch.randn(1, config["effnet_in_channels"], *size, generator=g)
    if config["pixel_mapper_in_channels"] not in (None, 3) or rng.random() < 0.5:
        channels = config["pixel_mapper_in_channels"] or 3
        inputs["pixels"] = torch.rand(1, channels, rng.randint(2, 8), rng.randint(2, 8), generator=g)
    for name in config["timestep_conditioning_type"]:
        if rng.random() < 0.7:
            inputs[name] = torch.rand(1, generator=g)
    return inputs


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere (zero-initialised gammas and betas included, so parity can fail)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def check_config(seed: int) -> None:
    rng = random.Random(seed)
    config = random_config(rng)
    torch.manual_seed(seed)
    reference = DiffusersUNet(**config).eval()
    randomize_(reference, seed)
    ours = StableCascadeUNet(**config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    inputs = random_inputs(config, rng, seed)
    with torch.no_grad():
        expected = reference(**inputs).sample
        got = ours(**inputs).sample
    assert got.shape == expected.shape, config
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(
        got / scale, expected / scale, atol=2e-5, rtol=0, msg=lambda m: f"{config}\n{m}"
    )


@pytest.mark.parametrize("seed", range(FAST_CONFIGS))
def test_random_diffusers_configs_load_strictly_and_match(seed: int) -> None:
    check_config(seed)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(FAST_CONFIGS, SLOW_CONFIGS))
def test_more_random_diffusers_configs_load_strictly_and_match(seed: int) -> None:
    check_config(seed)


def test_diffusers_test_decoder_config_with_minus_one_heads_loads() -> None:
    """diffusers' own pipeline tests build the decoder with ``num_attention_heads=[-1, -1, 1, 2]``."""
    config = {
        "in_channels": 4,
        "out_channels": 4,
        "conditioning_dim": 128,
        "block_out_channels": [16, 32, 64, 128],
        "num_attention_heads": [-1, -1, 1, 2],
        "down_num_layers_per_block": [1, 1, 1, 1],
        "up_num_layers_per_block": [1, 1, 1, 1],
        "down_blocks_repeat_mappers": [1, 1, 1, 1],
        "up_blocks_repeat_mappers": [3, 3, 2, 2],
        "block_types_per_layer": [[RES, TIME], [RES, TIME], [RES, TIME, ATTN], [RES, TIME, ATTN]],
        "switch_level": None,
        "clip_text_pooled_in_channels": 32,
        "dropout": [0.1, 0.1, 0.1, 0.1],
    }
    ours = StableCascadeUNet(**config)
    assert ours.config.to_dict()["num_attention_heads"] == [-1, -1, 1, 2]
    ours.load_state_dict(DiffusersUNet(**config).state_dict(), strict=True)


@pytest.mark.parametrize(
    ("heads", "message"),
    [
        ((0, 2), "level 0"),
        ((-1, 2), "level 0"),
        ((9, 2), "between 1 and its 8 channels"),
        ((True, 2), "whole number"),
    ],
)
def test_attention_levels_still_need_a_usable_head_count(heads: tuple[Any, ...], message: str) -> None:
    kwargs = {
        "block_out_channels": (8, 8),
        "num_attention_heads": heads,
        "conditioning_dim": 8,
        "down_num_layers_per_block": (1, 1),
        "up_num_layers_per_block": (1, 1),
    }
    with pytest.raises((ValueError, TypeError), match=message):
        StableCascadeUNet(**kwargs)
