"""Issue 19: FP8 linears for Stage C: the quantization math and the emulated matmul, on a CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tiny
from stable_cascade import StableCascadeUNet
from stable_cascade.nn.fp8 import E4M3_MAX, Fp8Linear, fp8_supported, quantize_rows
from stable_cascade.specs import UNET_VARIANTS


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got.float() - expected.float()).norm() / expected.float().norm())


def test_rows_are_scaled_to_the_e4m3_range_and_round_trip_within_its_precision() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 256, generator=g) * torch.logspace(-3, 3, 64)[:, None]  # rows of any magnitude
    x[5] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(x)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64, 1) and scale.dtype == torch.float32
    amax = q.float().abs().amax(dim=1)
    assert torch.equal(amax[torch.arange(64) != 5], torch.full((63,), E4M3_MAX))  # each row's peak → 448
    restored = q.float() * scale
    assert torch.equal(restored[5], torch.zeros(256))
    # e4m3 keeps 3 mantissa bits: relative rounding error ≤ 2^-4 for values in its normal range.
    normal = x.abs() >= scale * 2.0**-6
    assert ((restored - x).abs() <= x.abs() * 2.0**-4 + 1e-30)[normal].all()
    assert relative_error(restored, x) < 0.03


def test_emulated_fp8_linear_is_close_to_bfloat16() -> None:
    g = torch.Generator().manual_seed(1)
    linear = nn.Linear(512, 2048)
    with torch.no_grad():
        linear.weight.normal_(0, 0.02, generator=g)
        linear.bias.normal_(0, 0.02, generator=g)
    x = torch.randn(4, 96, 512, generator=g)
    fp8 = Fp8Linear(linear, emulate=True)
    assert fp8.weight is linear.weight and fp8.bias is linear.bias  # shared, not copied
    with torch.no_grad():
        exact = linear(x)
        got = fp8(x)
        bf16 = linear.to(torch.bfloat16)(x.bfloat16())
    assert got.shape == exact.shape and got.dtype == torch.float32
    fp8_error, bf16_error = relative_error(got, exact), relative_error(bf16, exact)
    # FP8 rounds each factor to 3 mantissa bits (bf16: 7): ~16x bf16's error, a few percent at most.
    assert bf16_error < fp8_error < 0.05
    assert fp8_error < 40 * bf16_error


def test_the_hardware_call_satisfies_scaled_mm_layout_rules() -> None:
    """On the meta device ``torch._scaled_mm`` runs only its shape, dtype and layout checks."""
    with torch.device("meta"):
        linear = nn.Linear(2048, 8192).to(torch.bfloat16)
        out = Fp8Linear(linear)(torch.empty(2, 576, 2048, dtype=torch.bfloat16))
    assert out.shape == (2, 576, 8192) and out.dtype == torch.bfloat16


def prior() -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(UNET_VARIANTS["tiny_prior"]), scale=0.1).eval()  # type: ignore[return-value]


def test_unet_fp8_is_refused_without_hardware_and_emulates_close_to_float32() -> None:
    model = prior()
    if not fp8_supported(torch.device("cpu")):
        with pytest.raises(ValueError, match=r"compute capability 9\.0.*on cpu.*emulate=True"):
            model.enable_fp8()
    g = torch.Generator().manual_seed(2)
    inputs = {
        "clip_text": torch.randn(2, 7, 24, generator=g),
        "clip_text_pooled": torch.randn(2, 1, 24, generator=g),
        "clip_img": torch.randn(2, 1, 16, generator=g),
    }
    x = torch.randn(2, 16, 6, 6, generator=g)
    with torch.no_grad():
        exact = model(x, 0.4, **inputs).sample  # (on CPUs this packs the attention projections first)
        keys = {k: v.data_ptr() for k, v in model.state_dict().items()}
        converted = model.enable_fp8(min_features=16, emulate=True)
        got = model(x, 0.4, **inputs).sample
        assert {k: v.data_ptr() for k, v in model.state_dict().items()} == keys  # same keys, same tensors
        assert converted == sum(isinstance(m, Fp8Linear) for m in model.modules()) > 0
        assert 0 < relative_error(got, exact) < 0.05
        model.disable_fp8()
        assert not any(isinstance(m, Fp8Linear) for m in model.modules())
        assert torch.equal(model(x, 0.4, **inputs).sample, exact)
