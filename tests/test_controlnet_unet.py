"""ControlNet residuals in the UNet: parity with the original Stage C ``cnet`` forward.

The reference below is written from the behaviour of the original ``StageC._down_encode`` /
``_up_decode`` with a ``ControlNetDeliverer`` and of the original ``ControlNet`` backbones: one
residual is taken per ResBlock call (down path, then up path, repeats included), resized bilinearly
with ``align_corners=True`` to x and added just before the call (in the up path after x was resized
to the skip). It reuses the UNet's blocks, whose numerics are checked against diffusers elsewhere.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import torch.nn.functional as F
from test_controlnet import TINY, random_controlnet
from torch import nn

from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.layers import ResBlock, TimestepBlock, timestep_embedding
from stable_cascade.nn.unet import StableCascadeUNet, UNetCache
from stable_cascade.nn.unet_state import resblock_widths
from stable_cascade.specs import UNET_VARIANTS, UNetConfig

PRIOR = UNET_VARIANTS["tiny_prior"].replace(
    down_num_layers_per_block=(2, 1),
    up_num_layers_per_block=(1, 2),
    down_blocks_repeat_mappers=(2, 1),
    up_blocks_repeat_mappers=(1, 3),  # deep level first
)
DECODER = UNET_VARIANTS["tiny_decoder"]  # strided levels of widths 16, 32, 32, 32; up repeats 2, 2, 1, 1


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def _add(x: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    if residual is None:
        return x
    return x + F.interpolate(residual, size=x.shape[-2:], mode="bilinear", align_corners=True)


def reference_unet(
    unet: StableCascadeUNet, sample: torch.Tensor, r: torch.Tensor, cache: UNetCache, cnet: Sequence
) -> torch.Tensor:
    """The original forward with a ControlNet deliverer, over the UNet's blocks and prepared states."""
    delivered = iter(cnet)
    r_embed = timestep_embedding(r, unet.config.timestep_ratio_embedding_dim)
    x = unet.embedding(sample)
    for term in cache.added:
        x = x + term
    levels: list[torch.Tensor] = []
    for i, (blocks, down, mappers) in enumerate(
        zip(unet.down_blocks, unet.down_downscalers, unet.down_repeat_mappers, strict=True)
    ):
        x = down(x)
        for rep in range(len(mappers) + 1):
            for k, block in enumerate(blocks):
                if isinstance(block, ResBlock):
                    x = block(_add(x, next(delivered, None)))
                elif isinstance(block, TimestepBlock):
                    x = block(x, r_embed, cache.down[i][k])
                else:
                    x = block(x, cache.down[i][k])
            if rep < len(mappers):
                x = mappers[rep](x)
        levels.insert(0, x)
    x = levels[0]
    for i, (blocks, up, mappers) in enumerate(
        zip(unet.up_blocks, unet.up_upscalers, unet.up_repeat_mappers, strict=True)
    ):
        for rep in range(len(mappers) + 1):
            for k, block in enumerate(blocks):
                if isinstance(block, ResBlock):
                    skip = levels[i] if k == 0 and i > 0 else None
                    if skip is not None and x.shape[-2:] != skip.shape[-2:]:
                        x = F.interpolate(x.float(), skip.shape[-2:], mode="bilinear", align_corners=True)
                    x = block(_add(x, next(delivered, None)), skip)
                elif isinstance(block, TimestepBlock):
                    x = block(x, r_embed, cache.up[i][k])
                else:
                    x = block(x, cache.up[i][k])
            if rep < len(mappers):
                x = mappers[rep](x)
        x = up(x)
    return unet.clf(x)


def _layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    out = F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias, 1e-5)
    return out.permute(0, 3, 1, 2)


def reference_controlnet(model: ControlNet, x: torch.Tensor) -> list[torch.Tensor | None]:
    """The original ControlNet forward, written functionally from its module definitions."""
    cfg, sd = model.config, model.state_dict()
    if cfg.backbone == "simple":
        h = F.leaky_relu(F.conv2d(x, sd["backbone.0.weight"], sd["backbone.0.bias"], padding=1), 0.2)
        h = F.conv2d(h, sd["backbone.2.weight"], sd["backbone.2.bias"], padding=1)
    elif cfg.backbone == "large":
        h = F.leaky_relu(F.conv2d(x, sd["backbone.0.weight"], sd["backbone.0.bias"]), 0.2)
        h = F.conv2d(h, sd["backbone.2.weight"], sd["backbone.2.bias"])
        for i in range(cfg.large_blocks):
            block = model.backbone[3 + i].blocks
            inner = F.conv2d(F.gelu(_layer_norm(h, block[0])), block[2].weight, block[2].bias, padding=1)
            inner = F.conv2d(F.gelu(_layer_norm(inner, block[3])), block[5].weight, block[5].bias, padding=1)
            h = h + inner
        last = model.backbone[3 + cfg.large_blocks]
        h = F.conv2d(h, last.weight, last.bias)
    else:  # effnet: the stem (unpadded, bias-free for c != 3), then EfficientNetV2-S stages and head
        stem, bn = model.backbone[0][0], model.backbone[0][1]
        h = F.conv2d(x, stem.weight, stride=2, padding=0 if cfg.in_channels != 3 else 1)
        h = F.silu(F.batch_norm(h, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, 1e-3))
        h = model.backbone[1:](h)
    out: list[torch.Tensor | None] = [None] * (max(cfg.proj_blocks) + 1)
    for i, index in enumerate(cfg.proj_blocks):
        p = F.leaky_relu(F.conv2d(h, sd[f"projections.{i}.0.weight"]), 0.2)
        out[index] = F.conv2d(p, sd[f"projections.{i}.2.weight"])
    return out


def _inputs(config: UNetConfig, batch: int, h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    inputs = {"clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g)}
    if config.clip_text_in_channels is not None:
        inputs["clip_text"] = torch.randn(batch, 5, config.clip_text_in_channels, generator=g)
    if config.effnet_in_channels is not None:
        inputs["effnet"] = torch.randn(batch, config.effnet_in_channels, 3, 3, generator=g)
    return inputs


def _check_parity(config: UNetConfig, cnet: list[torch.Tensor | None], h: int, w: int) -> torch.Tensor:
    unet = randomize_(StableCascadeUNet(config))
    sample = torch.randn(2, config.in_channels, h, w, generator=torch.Generator().manual_seed(4))
    r = torch.tensor([0.3, 0.8])
    with torch.no_grad():
        cache = unet.prepare(sample.shape[-2:], **_inputs(config, 2, h, w))
        expected = reference_unet(unet, sample, r, cache, cnet)
        ours = unet(sample, r, cache=cache, controlnet_residuals=cnet).sample
        prepared = unet.prepare(sample.shape[-2:], **_inputs(config, 2, h, w), controlnet_residuals=cnet)
        cached = unet(sample, r, cache=prepared).sample
        plain = unet(sample, r, cache=cache).sample
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached, ours, rtol=0, atol=0)
    assert (ours - plain).abs().max() > 1e-3, "the residuals must change the prediction"
    return ours


@pytest.mark.parametrize("backbone", sorted(TINY))
def test_every_backbone_matches_the_original_controlnet_and_stage_c(backbone: str) -> None:
    config = TINY[backbone].replace(proj_blocks=(0, 3, 5, 9, 12, 17)[: len(TINY[backbone].proj_blocks)])
    model = random_controlnet(config)
    control = torch.rand(2, config.in_channels, 72, 56, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cnet = model(control)
        expected = reference_controlnet(model, control)
    assert [c is None for c in cnet] == [c is None for c in expected]
    for ours, theirs in zip(cnet, expected, strict=True):
        if ours is not None and theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert len(resblock_widths(PRIOR)) == 12  # down 2·2 + 1, up 1 + 2·3 (repeats counted)
    _check_parity(PRIOR, cnet, 7, 5)


def test_every_resblock_call_down_and_up_with_repeats_and_odd_sizes() -> None:
    calls = resblock_widths(DECODER)
    g = torch.Generator().manual_seed(6)
    cnet = [None if width != 32 else torch.randn(1, 32, 3, 2, generator=g) for _, _, width in calls]
    assert sum(c is not None for c in cnet) > 6 and cnet[0] is None
    _check_parity(DECODER, cnet, 26, 22)  # 13×11 embedded: the up path resizes x to the skips


def test_each_call_index_is_placed_individually() -> None:
    """A residual at a single index k agrees with the reference for every k (an off-by-one fails)."""
    g = torch.Generator().manual_seed(7)
    for k in range(len(resblock_widths(PRIOR))):
        cnet: list[torch.Tensor | None] = [None] * k + [torch.randn(2, 32, 2, 3, generator=g)]
        _check_parity(PRIOR, cnet, 4, 6)


def test_all_none_and_batch_tiling() -> None:
    unet = randomize_(StableCascadeUNet(PRIOR))
    sample = torch.randn(4, 16, 3, 3, generator=torch.Generator().manual_seed(8))
    inputs = _inputs(PRIOR, 4, 3, 3)
    residual = torch.randn(2, 32, 3, 3, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        plain = unet(sample, 0.5, **inputs).sample
        nones = unet(sample, 0.5, **inputs, controlnet_residuals=[None] * 5).sample
        tiled = unet(sample, 0.5, **inputs, controlnet_residuals=[None, residual]).sample
        doubled = unet(sample, 0.5, **inputs, controlnet_residuals=[None, torch.cat([residual] * 2)]).sample
    torch.testing.assert_close(nones, plain, rtol=0, atol=0)
    torch.testing.assert_close(tiled, doubled, rtol=0, atol=0)


def test_wrong_residuals_are_clear_errors() -> None:
    unet = StableCascadeUNet(PRIOR).eval()
    sample = torch.randn(2, 16, 3, 3)
    inputs = _inputs(PRIOR, 2, 3, 3)
    calls = len(resblock_widths(PRIOR))
    with pytest.raises(ValueError, match=f"only {calls} ResBlock calls"):
        unet(sample, 0.5, **inputs, controlnet_residuals=[None] * 63 + [torch.zeros(2, 32, 3, 3)])
    with pytest.raises(ValueError, match=r"shape \(B, 32, h, w\)"):
        unet(sample, 0.5, **inputs, controlnet_residuals=[torch.zeros(2, 2048, 3, 3)])
    with pytest.raises(ValueError, match="does not divide the sample batch 2"):
        unet(sample, 0.5, **inputs, controlnet_residuals=[torch.zeros(3, 32, 3, 3)])
