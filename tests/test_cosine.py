"""The cosine schedule: Stability's reference check values, analytic identities and dtype handling."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch

import stable_cascade.diffusion
from stable_cascade.diffusion.cosine import (
    alpha_cumprod,
    logsnr,
    noise_cond,
    reference_timesteps,
)

S = 0.008


def cosine_alpha(t: float, s: float = S) -> float:
    """ᾱ(t) in plain float64 math, unclamped."""
    return math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2


def test_stage_c_check_values() -> None:
    schedule = reference_timesteps(20, shift=2.0)
    assert len(schedule) == 20
    assert schedule.t.shape == schedule.logsnr.shape == (21,)
    assert schedule.r.shape == (20,)
    first, last = [-9.2102, -6.4863, -5.0878, -4.2562, -3.6515], [2.1643, 3.4349]
    torch.testing.assert_close(schedule.logsnr[:5], torch.tensor(first), atol=1e-4, rtol=0)
    torch.testing.assert_close(schedule.logsnr[18:20], torch.tensor(last), atol=1e-4, rtol=0)
    r_first, r_last = [0.99358, 0.97496, 0.94969, 0.92396, 0.89751], [0.20181, 0.10627]
    torch.testing.assert_close(schedule.r[:5], torch.tensor(r_first), atol=1e-4, rtol=0)
    torch.testing.assert_close(schedule.r[18:], torch.tensor(r_last), atol=1e-4, rtol=0)
    assert schedule.logsnr[-1].item() == pytest.approx(9.21007 - 2 * math.log(2.0), abs=1e-4)


def test_float32_upper_limit() -> None:
    # ᾱ(0) clamps to 0.9999, and float32 rounds 1 - 0.9999 so that the limit is 9.21007, not 9.21024.
    assert reference_timesteps(10).logsnr[-1].item() == pytest.approx(9.21007, abs=1e-5)
    shifted = logsnr(torch.tensor([0.0, 1.0]), shift=0.5).tolist()
    assert shifted == pytest.approx([9.21007, -9.21024 + 2 * math.log(2.0)], abs=1e-4)


def test_stage_b_check_values() -> None:
    schedule = reference_timesteps(10, shift=1.0)
    expected = torch.tensor([0.99358, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    torch.testing.assert_close(schedule.r, expected, atol=1e-4, rtol=0)


def test_iteration_pairs_current_and_next() -> None:
    schedule = reference_timesteps(4, shift=2.0)
    steps = list(schedule)
    assert len(steps) == 4
    for i, (r, current, following) in enumerate(steps):
        assert r == schedule.r[i] and current == schedule.logsnr[i] and following == schedule.logsnr[i + 1]


def test_img2img_start() -> None:
    schedule = reference_timesteps(16, t_start=0.8)
    torch.testing.assert_close(schedule.t, torch.linspace(0.8, 0.0, 17))
    assert schedule.r[0].item() == pytest.approx(0.8, abs=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shift_one_is_plain_logsnr(dtype: torch.dtype) -> None:
    t = torch.linspace(0, 1, 101, dtype=dtype)
    alpha = alpha_cumprod(t)
    assert torch.equal(logsnr(t, shift=1.0), (alpha / (1 - alpha)).log())


def test_shift_offsets_logsnr_inside_limits() -> None:
    t = torch.linspace(0.3, 0.9, 13, dtype=torch.float64)
    shifted = logsnr(t, shift=2.0)
    torch.testing.assert_close(shifted, logsnr(t) - 2 * math.log(2.0))
    torch.testing.assert_close(logsnr(t, shift=0.5), logsnr(t) + 2 * math.log(2.0))


@pytest.mark.parametrize("shift", [0.5, 2.0, 4.0])
def test_shift_clamps_to_unshifted_limits(shift: float) -> None:
    ends = torch.tensor([1.0, 0.0], dtype=torch.float64)
    low, high = logsnr(ends).tolist()
    assert low == pytest.approx(math.log(1e-4 / 0.9999)) and high == pytest.approx(math.log(0.9999 / 1e-4))
    values = logsnr(torch.linspace(0, 1, 201, dtype=torch.float64), shift=shift)
    assert values.min().item() >= low and values.max().item() <= high
    assert (values == low).any() or (values == high).any()


def test_alpha_cumprod_matches_formula_and_clamps() -> None:
    t = torch.linspace(0.005, 0.99, 50, dtype=torch.float64)
    expected = torch.tensor([cosine_alpha(v) for v in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(alpha_cumprod(t), expected, rtol=1e-12, atol=0)
    ends = alpha_cumprod(torch.tensor([0.0, 1.0], dtype=torch.float64)).tolist()
    assert ends == [0.9999, 1e-4]


@pytest.mark.parametrize("scaler", [0.5, 1.0, 2.0])
def test_alpha_cumprod_monotone_decreasing(scaler: float) -> None:
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    alpha = alpha_cumprod(t, scaler=scaler)
    assert (alpha[1:] <= alpha[:-1]).all()
    inside = (alpha > 1e-4) & (alpha < 0.9999)
    assert inside.sum() > 900
    inner = alpha[inside]
    assert (inner[1:] < inner[:-1]).all()


def test_scaler_warps_t() -> None:
    t = torch.linspace(0, 1, 21, dtype=torch.float64)
    torch.testing.assert_close(alpha_cumprod(t, scaler=2.0), alpha_cumprod(1 - (1 - t) ** 2))
    torch.testing.assert_close(alpha_cumprod(t, scaler=0.5), alpha_cumprod(t**0.5))
    assert not torch.allclose(alpha_cumprod(t, scaler=2.0), alpha_cumprod(t))


@pytest.mark.parametrize(("dtype", "atol"), [(torch.float64, 1e-9), (torch.float32, 2e-4)])
def test_noise_cond_inverts_schedule(dtype: torch.dtype, atol: float) -> None:
    t = torch.linspace(0.01, 0.99, 99, dtype=dtype)
    torch.testing.assert_close(noise_cond(logsnr(t)), t, atol=atol, rtol=0)


def test_noise_cond_range() -> None:
    r = noise_cond(torch.tensor([-50.0, -9.21, 0.0, 9.21, 50.0]))
    assert r.min().item() >= 0.0 and r.max().item() <= 1.0
    assert r[0].item() == 1.0 and r[-1].item() == pytest.approx(0.0, abs=1e-5)
    assert (r[1:] <= r[:-1]).all()


def test_dtypes_and_devices_preserved() -> None:
    t64 = torch.rand(5, dtype=torch.float64)
    for fn in (alpha_cumprod, logsnr, noise_cond):
        assert fn(t64).dtype == torch.float64
        assert fn(t64.float()).dtype == torch.float32
        assert fn(t64.bfloat16()).dtype == torch.float32  # half types compute in float32
        assert fn(t64.to("meta")).device.type == "meta"
    assert logsnr(t64, shift=2.0).dtype == torch.float64
    schedule = reference_timesteps(3, shift=2.0, dtype=torch.float64)
    assert schedule.logsnr.dtype == schedule.r.dtype == torch.float64


def test_python_float_input() -> None:
    assert alpha_cumprod(0.5).item() == pytest.approx(cosine_alpha(0.5), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"steps": 2.5},
        {"steps": 4, "t_start": 0.0},
        {"steps": 4, "t_start": 1.2},
        {"steps": 4, "t_start": 0.5, "t_end": 0.6},
        {"steps": 4, "shift": 0.0},
    ],
)
def test_reference_timesteps_rejects_bad_arguments(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        reference_timesteps(**kwargs)  # type: ignore[arg-type]


def test_diffusion_layer_imports_no_model_code() -> None:
    package = Path(stable_cascade.diffusion.__file__).parent
    allowed = ("stable_cascade.specs", "stable_cascade.checkpoint", "stable_cascade.diffusion")
    for path in package.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            for name in names:
                if name.startswith("stable_cascade"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"
