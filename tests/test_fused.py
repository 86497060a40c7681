"""Issue 6: the cache-sized channel MLP kernels (CPU inference) equal the op-by-op blocks."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from stable_cascade.nn import fused, layers, stage_a
from stable_cascade.nn.layers import ResBlock
from stable_cascade.nn.stage_a import MixingBlock


def spy(monkeypatch: pytest.MonkeyPatch, module: Any, name: str) -> list[int]:
    """Count the calls of ``module.name``."""
    calls: list[int] = []
    original: Callable[..., torch.Tensor] = getattr(module, name)

    def counted(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)
    return calls


def randomized(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return block.eval()


def inputs(channels: int, channels_last: bool, seed: int) -> torch.Tensor:
    x = torch.randn(2, channels, 13, 9, generator=torch.Generator().manual_seed(seed))
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("skip_channels", [0, 8])
@pytest.mark.parametrize("channels_last", [True, False])
def test_resblock_kernel_equals_the_module_ops(
    monkeypatch: pytest.MonkeyPatch, skip_channels: int, channels_last: bool
) -> None:
    monkeypatch.setattr(fused, "CHUNK_BYTES", 1)  # 32-row chunks: several per image, a ragged last one
    calls = spy(monkeypatch, layers, "grn_mlp_residual")
    block = randomized(ResBlock(16, skip_channels), seed=skip_channels)
    x = inputs(16, channels_last, seed=1)
    skip = inputs(skip_channels, channels_last, seed=2) if skip_channels else None
    expected = block(x, skip)  # autograd on: the op-by-op path
    assert not calls
    with torch.no_grad():
        got = block(x, skip)
    assert calls == [1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("channels_last", [True, False])
def test_stage_a_kernel_equals_the_module_ops(monkeypatch: pytest.MonkeyPatch, channels_last: bool) -> None:
    monkeypatch.setattr(fused, "CHUNK_BYTES", 1)
    calls = spy(monkeypatch, stage_a, "mlp_residual")
    block = randomized(MixingBlock(12), seed=3)
    x = inputs(12, channels_last, seed=4)
    expected = block(x)
    with torch.no_grad():
        got = block(x)
    assert calls == [1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_training_mode_keeps_the_module_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy(monkeypatch, layers, "grn_mlp_residual")
    block = ResBlock(8, dropout=0.5).train()
    with torch.no_grad():
        block(inputs(8, True, seed=5))  # dropout is live: the kernel (which has none) must not run
    assert not calls


@pytest.mark.parametrize("onednn", [True, False])
def test_both_matmul_paths_equal_the_module_ops(monkeypatch: pytest.MonkeyPatch, onednn: bool) -> None:
    """oneDNN's fused linear + GELU (float32), or F.linear and an in-place GELU (elsewhere)."""
    monkeypatch.setattr(fused, "_ONEDNN", onednn and fused._ONEDNN)
    monkeypatch.setattr(fused, "CHUNK_BYTES", 1)
    block = randomized(ResBlock(16, 8), seed=7)
    x, skip = inputs(16, True, seed=8), inputs(8, True, seed=9)
    mixing = randomized(MixingBlock(12), seed=10)
    y = inputs(12, True, seed=11)
    expected = block(x, skip), mixing(y)
    with torch.no_grad():
        got = block(x, skip), mixing(y)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_chunks_are_few_and_large(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 512² image's Stage A latent level (128², 384 channels: a 96 MiB hidden activation) takes
    two matmuls per 16 MiB chunk, not two per cache-sized one (thousands of short parallel regions,
    slower than the module under the passive OpenMP waits the CLI sets), and wide blocks run the kernels."""
    calls = spy(monkeypatch, fused, "linear")
    block = randomized(MixingBlock(384), seed=12)
    x = torch.randn(1, 384, 128, 128).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        block(x)
        assert len(calls) == 2 * 6
        calls.clear()
        ResBlock(1536).eval()(inputs(1536, True, seed=14)[:1, :, :4, :4])
    assert len(calls) == 2
