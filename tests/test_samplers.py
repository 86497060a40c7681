"""Schedules and samplers: diffusers parity, the reference formulas, and a Gaussian toy problem."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import diffusers
import pytest
import torch
from torch import Tensor

from stable_cascade.diffusion.cosine import alpha_cumprod
from stable_cascade.diffusion.samplers import (
    SAMPLERS,
    SamplerResult,
    ddim,
    ddpm,
    dpmpp_2m,
    euler_ancestral,
    get_sampler,
    lcm,
)
from stable_cascade.diffusion.timesteps import Schedule, diffusers_schedule, reference_schedule

SHAPE = (2, 4, 6, 6)
Sampler = Callable[..., SamplerResult]


def fake_eps(x: Tensor, ratio: Tensor) -> Tensor:
    """A fixed stand-in for the network: depends on the sample and the ratio."""
    return (torch.tanh(x) * 0.8 + 0.3 * ratio.view(-1, *[1] * (x.ndim - 1))).to(x.dtype)


def start(dtype: torch.dtype = torch.float32) -> Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(dtype)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def diffusers_loop(
    scheduler: diffusers.DDPMWuerstchenScheduler,
    x: Tensor,
    generator: torch.Generator | list[torch.Generator],
) -> Tensor:
    """diffusers' Stable Cascade pipelines' loop: timesteps[:-1], ratio = t expanded in the model dtype."""
    for t in scheduler.timesteps[:-1]:
        ratio = t.expand(x.shape[0]).to(x.dtype)
        x = scheduler.step(fake_eps(x, ratio), ratio, x, generator=generator).prev_sample
    return x


# --- schedules ---------------------------------------------------------------------------------


@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("kwargs", [{"num_inference_steps": 20}, {"timesteps": [1.0, 0.6, 0.3, 0.1, 0.0]}])
def test_diffusers_schedule_matches_scheduler(kwargs: dict[str, object], scaler: float) -> None:
    theirs = diffusers.DDPMWuerstchenScheduler(scaler=scaler)
    theirs.set_timesteps(**kwargs)
    schedule = diffusers_schedule(**kwargs, scaler=scaler)  # type: ignore[arg-type]
    assert torch.equal(schedule.t, theirs.timesteps)
    assert torch.equal(schedule.ratio, theirs.timesteps)
    assert torch.equal(schedule.alpha_cumprod, theirs._alpha_cumprod(theirs.timesteps, "cpu"))
    assert schedule.steps == len(theirs.timesteps) - 1


@pytest.mark.parametrize(
    "kwargs", [{}, {"num_inference_steps": 0}, {"timesteps": [0.0, 1.0]}, {"timesteps": [1.0, 0.5, 0.5]}]
)
def test_diffusers_schedule_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        diffusers_schedule(**kwargs)  # type: ignore[arg-type]


def test_reference_schedule_check_values() -> None:
    schedule = reference_schedule(20, shift=2.0)
    assert schedule.steps == 20 and schedule.alpha_cumprod_fn is None
    torch.testing.assert_close(schedule.t, torch.linspace(1, 0, 21))
    r_first, r_last = [0.99358, 0.97496, 0.94969, 0.92396, 0.89751], [0.20181, 0.10627]
    torch.testing.assert_close(schedule.ratio[:5], torch.tensor(r_first), atol=1e-4, rtol=0)
    torch.testing.assert_close(schedule.ratio[18:20], torch.tensor(r_last), atol=1e-4, rtol=0)
    logsnr = (schedule.alpha_cumprod / (1 - schedule.alpha_cumprod)).log()
    first, last = [-9.2102, -6.4863, -5.0878, -4.2562, -3.6515], [2.1643, 3.4349]
    torch.testing.assert_close(logsnr[:5], torch.tensor(first), atol=1e-3, rtol=0)
    torch.testing.assert_close(logsnr[18:20], torch.tensor(last), atol=1e-3, rtol=0)
    stage_b = reference_schedule(10).ratio[:10]
    torch.testing.assert_close(
        stage_b, torch.tensor([0.99358, *torch.linspace(0.9, 0.1, 9)]), atol=1e-4, rtol=0
    )
    img2img = reference_schedule(16, t_start=0.8)
    assert img2img.ratio[0].item() == pytest.approx(0.8, abs=1e-4)


def test_schedule_validates_and_moves() -> None:
    with pytest.raises(ValueError, match="same length"):
        Schedule(t=torch.zeros(3), alpha_cumprod=torch.zeros(3), ratio=torch.zeros(2))
    with pytest.raises(ValueError, match=">= 2"):
        Schedule(t=torch.zeros(1), alpha_cumprod=torch.zeros(1), ratio=torch.zeros(1))
    moved = diffusers_schedule(4).to("meta")
    assert moved.t.device.type == moved.alpha_cumprod.device.type == moved.ratio.device.type == "meta"
    assert moved.alpha_cumprod_fn is not None


# --- ddpm: diffusers parity ----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaler", [1.0, 2.0])
def test_ddpm_bit_identical_to_diffusers(dtype: torch.dtype, scaler: float) -> None:
    theirs = diffusers.DDPMWuerstchenScheduler(scaler=scaler)
    theirs.set_timesteps(20)
    theirs_gen, ours_gen = gen(), gen()
    expected = diffusers_loop(theirs, start(dtype), theirs_gen)
    got = ddpm(fake_eps, start(dtype), diffusers_schedule(20, scaler=scaler), generator=ours_gen)
    assert got.sample.dtype == dtype
    assert torch.equal(got.sample, expected)
    assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())  # a draw on every step


def test_ddpm_bit_identical_generator_list_and_custom_timesteps() -> None:
    for timesteps in ([1.0, 0.7, 0.4, 0.15, 0.0], [0.8, 0.5, 0.25, 0.1]):
        theirs = diffusers.DDPMWuerstchenScheduler()
        theirs.set_timesteps(timesteps=timesteps)
        expected = diffusers_loop(theirs, start(), [gen(3), gen(4)])
        got = ddpm(fake_eps, start(), diffusers_schedule(timesteps=timesteps), generator=[gen(3), gen(4)])
        assert torch.equal(got.sample, expected)


def test_callback_progress_and_no_mutation() -> None:
    x = start()
    original = x.clone()
    seen: list[tuple[int, float]] = []
    wrapped: list[list[int]] = []

    def callback(i: int, t: Tensor, sample: Tensor, x0: Tensor) -> Tensor | None:
        seen.append((i, t.item()))
        return torch.zeros_like(sample) if i == 3 else None

    def progress(steps: Iterable[int]) -> Iterable[int]:
        wrapped.append(list(steps))
        return wrapped[-1]

    schedule = diffusers_schedule(4)
    for sampler in SAMPLERS.values():
        seen.clear()
        result = sampler(fake_eps, x, schedule, generator=gen(), callback=callback, progress=progress)
        assert seen == [(i, schedule.t[i].item()) for i in range(4)]
        assert torch.equal(result.sample, torch.zeros_like(x))  # the last callback's replacement
        assert wrapped[-1] == [0, 1, 2, 3]
    assert torch.equal(x, original)


# --- the Gaussian toy problem --------------------------------------------------------------------

MU, STD = 0.5, 0.6  # data x0 ~ N(MU, STD²) per element


def gaussian_eps(x: Tensor, ratio: Tensor) -> Tensor:
    """The exact E[ε | x_t] for Gaussian data; ᾱ from the ratio as the network knows it (cosine)."""
    alpha = alpha_cumprod(ratio.double()).view(-1, *[1] * (x.ndim - 1))
    eps = (1 - alpha).sqrt() * (x.double() - alpha.sqrt() * MU) / (alpha * STD**2 + 1 - alpha)
    return eps.to(x.dtype)


# --- ddim: the reference formulas (Stability's DDIMSampler) ------------------------------------


def ddim_transcription(x: Tensor, schedule: Schedule, eta: float, generator: torch.Generator) -> list[float]:
    """Stability's DDIM step line by line in plain float math, one element at a time."""
    alphas, values = schedule.alpha_cumprod.tolist(), x.flatten().tolist()
    for i in range(schedule.steps):
        ratio = schedule.ratio[i].expand(x.shape[0]).to(x.dtype)  # the ratio in x's dtype, as promised
        eps = fake_eps(torch.tensor(values, dtype=x.dtype).view(x.shape), ratio)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).flatten().tolist() if eta > 0 else None
        a, b = math.sqrt(alphas[i]), math.sqrt(1 - alphas[i])
        a_prev, b_prev = math.sqrt(alphas[i + 1]), math.sqrt(1 - alphas[i + 1])
        sigma = eta * math.sqrt(b_prev**2 / b**2) * math.sqrt(1 - a**2 / a_prev**2)
        for j, (x_j, e_j) in enumerate(zip(values, eps.flatten().tolist(), strict=True)):
            x0 = (x_j - b * e_j) / a
            values[j] = a_prev * x0 + math.sqrt(b_prev**2 - sigma**2) * e_j + (sigma * z[j] if z else 0.0)
    return values


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("schedule", [reference_schedule(8, shift=2.0), diffusers_schedule(6)])
def test_ddim_matches_spec_transcription(schedule: Schedule, eta: float) -> None:
    x = start(torch.float64)
    expected = ddim_transcription(x, schedule, eta, gen(5))
    got = ddim(fake_eps, x, schedule, generator=gen(5), eta=eta).sample
    torch.testing.assert_close(
        got.flatten(), torch.tensor(expected, dtype=torch.float64), rtol=1e-9, atol=1e-9
    )


@pytest.mark.parametrize("schedule", [diffusers_schedule(20), reference_schedule(20, shift=2.0)])
def test_ddim_eta_one_is_ddpm(schedule: Schedule) -> None:
    states: dict[str, list[Tensor]] = {"ddpm": [], "ddim": []}
    result = {
        name: sampler(
            gaussian_eps,
            start(),
            schedule,
            generator=gen(2),
            callback=lambda i, t, x, x0, n=name: states[n].append(x),
        )
        for name, sampler in (("ddpm", ddpm), ("ddim", functools.partial(ddim, eta=1.0)))
    }
    # ddpm adds no noise into t = 0 (diffusers); ddim takes the reference's last noisy step: all
    # states but the last agree, and so does the x0 prediction both hand on.
    for ours, theirs in zip(states["ddpm"][:-1], states["ddim"][:-1], strict=True):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    torch.testing.assert_close(result["ddpm"].x0, result["ddim"].x0, atol=1e-5, rtol=0)
    ended_early = diffusers_schedule(timesteps=[1.0, 0.75, 0.5, 0.25, 0.05])
    a, b = (
        s(gaussian_eps, start(), ended_early, generator=gen(2))
        for s in (ddpm, functools.partial(ddim, eta=1))
    )
    torch.testing.assert_close(a.sample, b.sample, atol=1e-5, rtol=0)


# --- lcm: multistep consistency sampling (the original gdf LCMSampler) ----------------------------


def test_lcm_matches_a_hand_computed_trajectory() -> None:
    """Three steps on ᾱ = 0.1, 0.5, 0.9, 0.99 of one element, with ε = 0.5·x + ratio (ratio = t) and
    the draws of the generator written out: x0 = (x − b·ε)/a, then a_next·x0 + b_next·z; the last step
    returns x0 and draws nothing."""
    schedule = Schedule(
        t=torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64),
        alpha_cumprod=torch.tensor([0.1, 0.5, 0.9, 0.99], dtype=torch.float64),
        ratio=torch.tensor([1.0, 0.6, 0.3, 0.0], dtype=torch.float64),
    )

    def eps_model(x: Tensor, ratio: Tensor) -> Tensor:
        return 0.5 * x + ratio.view(-1, 1)

    z1, z2, after = torch.randn(3, 1, generator=gen(3), dtype=torch.float64).flatten().tolist()
    x = 0.8  # by hand: step 0 from ᾱ 0.1 (ratio 1.0), step 1 from 0.5 (0.6), step 2 from 0.9 (0.3)
    x0_0 = (x - math.sqrt(0.9) * (0.5 * x + 1.0)) / math.sqrt(0.1)
    x1 = math.sqrt(0.5) * x0_0 + math.sqrt(0.5) * z1
    x0_1 = (x1 - math.sqrt(0.5) * (0.5 * x1 + 0.6)) / math.sqrt(0.5)
    x2 = math.sqrt(0.9) * x0_1 + math.sqrt(0.1) * z2
    x0_2 = (x2 - math.sqrt(0.1) * (0.5 * x2 + 0.3)) / math.sqrt(0.9)
    seen: list[float] = []
    generator = gen(3)
    result = lcm(
        eps_model,
        torch.tensor([[x]], dtype=torch.float64),
        schedule,
        generator=generator,
        callback=lambda i, t, sample, x0: seen.append(sample.item()),
    )
    assert seen == pytest.approx([x1, x2, x0_2], rel=1e-12)
    assert result.sample.item() == pytest.approx(x0_2, rel=1e-12) and torch.equal(result.sample, result.x0)
    assert torch.randn(1, generator=generator, dtype=torch.float64).item() == after  # two draws, not three


def test_lcm_seeds_reproduce_and_each_step_draws_fresh_noise() -> None:
    schedule = reference_schedule(4)
    first, again = (lcm(fake_eps, start(), schedule, generator=gen(11)) for _ in range(2))
    assert torch.equal(first.sample, again.sample)
    other = lcm(fake_eps, start(), schedule, generator=gen(12))
    assert not torch.allclose(first.sample, other.sample)
    one = lcm(fake_eps, start(), reference_schedule(1), generator=gen(11))  # one step: the x0 prediction
    a, b = (
        math.sqrt(reference_schedule(1).alpha_cumprod[0]),
        math.sqrt(1 - reference_schedule(1).alpha_cumprod[0]),
    )
    expected = (start() - b * fake_eps(start(), reference_schedule(1).ratio[:1].expand(2))) / a
    torch.testing.assert_close(one.sample, expected)


# --- k-diffusion samplers: the clean end ---------------------------------------------------------


def test_k_samplers_end_at_the_x0_prediction() -> None:
    for sampler in (euler_ancestral, dpmpp_2m):
        result = sampler(fake_eps, start(), diffusers_schedule(5), generator=gen())
        assert torch.equal(result.sample, result.x0)
        early = sampler(fake_eps, start(), diffusers_schedule(timesteps=[1.0, 0.5, 0.2]), generator=gen())
        assert not torch.allclose(early.sample, early.x0)
    generator = gen()
    before = generator.get_state()
    dpmpp_2m(fake_eps, start(), diffusers_schedule(5), generator=generator)
    euler_ancestral(fake_eps, start(), diffusers_schedule(5), generator=generator, eta=0.0)
    assert torch.equal(generator.get_state(), before)  # deterministic: no draws


SAMPLER_CASES = {
    "ddpm": ddpm,
    "ddim": ddim,
    "ddim_eta1": functools.partial(ddim, eta=1.0),
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
}
# |std/STD − 1| allowed at 50 steps: the measured discretisation bias (shift 2 worst) plus margin. The
# first-order ancestral samplers (ddpm ≡ ddim η=1 ≡ euler_ancestral here) are underdispersed by
# 6 % (shift 1) to 10.6 % (shift 2) in exact discrete-time moments; it shrinks as 1/steps (below).
STD_TOLERANCE = {"ddpm": 0.12, "ddim_eta1": 0.12, "euler_ancestral": 0.12, "ddim": 0.05, "dpmpp_2m": 0.02}
SCHEDULE_CASES = {
    "diffusers": lambda steps: diffusers_schedule(steps),
    "reference": lambda steps: reference_schedule(steps),
    "reference_shift2": lambda steps: reference_schedule(steps, shift=2.0),
}


def toy_moments(name: str, schedule: Schedule) -> tuple[float, float, float]:
    """(mean error, relative std error of x0, relative std error of the sample) over 20000 samples."""
    generator = gen(1)
    x = torch.randn(4, 5000, generator=generator)
    result = SAMPLER_CASES[name](gaussian_eps, x, schedule, generator=generator)
    mean_error = result.x0.mean().item() - MU
    return mean_error, result.x0.std().item() / STD - 1, result.sample.std().item() / STD - 1


@pytest.mark.parametrize("schedule_name", SCHEDULE_CASES)
@pytest.mark.parametrize("name", SAMPLER_CASES)
def test_gaussian_toy_problem(name: str, schedule_name: str) -> None:
    mean_error, std_error, sample_std_error = toy_moments(name, SCHEDULE_CASES[schedule_name](50))
    assert abs(mean_error) < 0.02
    assert abs(std_error) < STD_TOLERANCE[name]
    assert abs(sample_std_error) < STD_TOLERANCE[name]


@pytest.mark.parametrize("name", ["ddpm", "ddim", "euler_ancestral"])
def test_gaussian_toy_first_order_bias_vanishes(name: str) -> None:
    mean_error, std_error, _ = toy_moments(name, reference_schedule(400, shift=2.0))
    assert abs(mean_error) < 0.02 and abs(std_error) < 0.03


# --- registry and arguments ----------------------------------------------------------------------


def test_get_sampler() -> None:
    assert set(SAMPLERS) == {"ddpm", "ddim", "euler_ancestral", "dpmpp_2m", "lcm"}
    assert get_sampler("dpmpp_2m") is dpmpp_2m
    with pytest.raises(ValueError, match="ddim, ddpm, dpmpp_2m, euler_ancestral, lcm"):
        get_sampler("euler")
    for sampler in (ddim, euler_ancestral):
        with pytest.raises(ValueError, match="eta"):
            sampler(fake_eps, start(), diffusers_schedule(2), eta=-0.5)


def test_repeated_clamped_alpha_is_a_no_op_step() -> None:
    # With 200 steps the first diffusers times all clamp to ᾱ = 1e-4: those steps must not blow up.
    schedule = diffusers_schedule(200)
    assert schedule.alpha_cumprod[0] == schedule.alpha_cumprod[1]
    for name in SAMPLER_CASES:
        assert torch.isfinite(SAMPLER_CASES[name](fake_eps, start(torch.float64), schedule).sample).all()
