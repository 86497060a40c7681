"""Samplers as pure functions over a noise-predicting model, in the style of k-diffusion.

Every sampler has one signature, ``sampler(eps_model, x, schedule, generator, callback, progress)``,
and loops over ``schedule.steps``: it calls ``eps_model(x, ratio[i])`` with the ratio expanded to the
batch and cast to x's dtype, steps from time i to time i + 1, then lets ``callback`` replace x.
Step noise is drawn with :func:`~stable_cascade.diffusion.noise.randn`, so seeds reproduce diffusers.

Conventions at the clean end: the clamped cosine ᾱ never reaches 1 (0.9999 at t = 0, σ = b/a = 0.01),
so a schedule ending at t = 0 is treated as ending at the data: ``ddpm`` adds no noise into t = 0
(diffusers), ``euler_ancestral`` and ``dpmpp_2m`` step to σ = 0, i.e. return the x0 prediction
(k-diffusion), ``ddim`` takes the reference's step to the last ᾱ literally (the reference hands
on the x0 prediction, which every sampler returns as ``SamplerResult.x0``), and ``lcm`` returns the
x0 prediction of its last step, wherever the schedule ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
from torch import Tensor

from stable_cascade.diffusion.noise import Generators, randn
from stable_cascade.diffusion.presets import SAMPLER_NAMES
from stable_cascade.diffusion.timesteps import NoiseModel, Progress, SamplerResult, Schedule, StepCallback


def ddpm_posterior(
    x: Tensor, eps: Tensor, alpha_t: Tensor, alpha_prev: Tensor, t_prev: Tensor, generator: Generators | None
) -> Tensor:
    """One DDPM posterior step from ᾱ_t to ᾱ_prev, bit-identical to ``DDPMWuerstchenScheduler.step``.

    ``alpha_t``, ``alpha_prev`` and ``t_prev`` hold 1 or B values. Noise is drawn on every step, also
    when ``t_prev == 0`` where it is not added, so generators end in diffusers' state. The result has
    ``eps``' dtype, as diffusers' ``DDPMWuerstchenScheduler.step``.
    """
    view = (-1,) + (1,) * (x.ndim - 1)  # per batch item → (B, 1, ..., 1), never 0-dim (type promotion)
    alpha_t, alpha_prev = alpha_t.reshape(view), alpha_prev.reshape(view)
    alpha = alpha_t / alpha_prev
    # Operation order as in diffusers, so float32 results are bit-identical.
    mean = (1.0 / alpha).sqrt() * (x - (1 - alpha) * eps / (1 - alpha_t).sqrt())
    std = ((1 - alpha) * (1.0 - alpha_prev) / (1.0 - alpha_t)).sqrt()
    std = std * (t_prev != 0).to(std.dtype).reshape(view)  # no noise into t = 0
    noise = randn(mean.shape, generator, device=eps.device, dtype=eps.dtype)
    return (mean + std * noise).to(eps.dtype)


class DDPMStep(NamedTuple):
    """What one DDPM step needs that does not depend on x: the network's ratio (B,) in x's dtype,
    and coefficients of shape (1, 1, …) (never 0-dim: type promotion), from :func:`ddpm_steps`."""

    ratio: Tensor
    sqrt_alpha: Tensor  # √ᾱ_t
    sqrt_one_minus_alpha: Tensor  # √(1 − ᾱ_t)
    mean_scale: Tensor  # √(1/α), α = ᾱ_t/ᾱ_prev
    eps_scale: Tensor  # 1 − α
    std: Tensor  # the posterior's standard deviation, 0 into t = 0

    def x0(self, x: Tensor, eps: Tensor) -> Tensor:
        """The step's prediction of the clean sample, in x's dtype."""
        return ((x - self.sqrt_one_minus_alpha * eps) / self.sqrt_alpha).to(x.dtype)

    def posterior(self, x: Tensor, eps: Tensor, generator: Generators | None) -> Tensor:
        """:func:`ddpm_posterior`, bit for bit: the same operations on x, in the same order."""
        mean = self.mean_scale * (x - self.eps_scale * eps / self.sqrt_one_minus_alpha)
        noise = randn(mean.shape, generator, device=eps.device, dtype=eps.dtype)
        return (mean + self.std * noise).to(eps.dtype)


def ddpm_steps(schedule: Schedule, x: Tensor) -> list[DDPMStep]:
    """Every step's :class:`DDPMStep`, computed at once with :func:`ddpm_posterior`'s operations."""
    view = (-1,) + (1,) * (x.ndim - 1)
    cast = schedule.ratio[:-1].to(x.dtype)  # diffusers' pipelines pass ``t.expand(B).to(dtype)``
    if schedule.alpha_cumprod_fn is not None:  # diffusers: ᾱ_t at the cast ratio, ᾱ_prev at t[i+1]
        alpha_t = schedule.alpha_cumprod_fn(cast)
        # float32 t as diffusers; float64 x gets float64 t, whose ᾱ clamps exactly like ᾱ_t's.
        alpha_prev = schedule.alpha_cumprod_fn(schedule.t[1:].to(_working_dtype(x)))
    else:
        alpha_t, alpha_prev = schedule.alpha_cumprod[:-1], schedule.alpha_cumprod[1:]
    alpha_t, alpha_prev = alpha_t.reshape(view), alpha_prev.reshape(view)
    alpha = alpha_t / alpha_prev
    std = ((1 - alpha) * (1.0 - alpha_prev) / (1.0 - alpha_t)).sqrt()
    std = std * (schedule.t[1:] != 0).to(std.dtype).reshape(view)  # no noise into t = 0
    columns = (alpha_t.sqrt(), (1 - alpha_t).sqrt(), (1.0 / alpha).sqrt(), 1 - alpha, std)
    return [
        DDPMStep(r.expand(x.shape[0]), *(c[i : i + 1] for c in columns)) for i, r in enumerate(cast.unbind())
    ]


def ddpm(
    eps_model: NoiseModel,
    x: Tensor,
    schedule: Schedule,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
) -> SamplerResult:
    """Ancestral DDPM, bit-identical to diffusers' pipelines looping ``DDPMWuerstchenScheduler.step``.

    A step is the network call and the posterior's arithmetic on x: the schedule's part is computed
    once per run (:func:`ddpm_steps`), and the x0 prediction only where it is used (every step with
    a ``callback``, else the last step's, after the loop).
    """
    steps = ddpm_steps(schedule.to(x.device), x)
    x0: Tensor | None = None
    last: tuple[DDPMStep, Tensor, Tensor] | None = None  # the latest step, its x and ε
    for i in _indices(schedule, progress):
        eps = eps_model(x, steps[i].ratio)
        last = (steps[i], x, eps)
        x0 = steps[i].x0(x, eps) if callback is not None else None
        x = steps[i].posterior(x, eps, generator)
        if x0 is not None:
            x = _after_step(callback, i, schedule, x, x0)
    if last is None:
        return SamplerResult(sample=x, x0=x)
    return SamplerResult(sample=x, x0=x0 if x0 is not None else last[0].x0(last[1], last[2]))


def ddim(
    eps_model: NoiseModel,
    x: Tensor,
    schedule: Schedule,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
    eta: float = 0.0,
) -> SamplerResult:
    """DDIM as Stability's reference ``DDIMSampler``; ``eta=1`` is its DDPM sampler.

    With a = √ᾱ, b = √(1−ᾱ): x0 = (x − b·ε)/a, σ = η·√(b_prev²/b²)·√(1 − a²/a_prev²),
    x_prev = a_prev·x0 + √(b_prev² − σ²)·ε + σ·z. Noise is drawn on every step when η > 0 (as
    :func:`ddpm` draws it), never when η = 0.
    """
    _check_eta(eta)
    schedule = schedule.to(x.device)
    alphas = schedule.alpha_cumprod.tolist()
    work = _working_dtype(x)
    ratios = _ratios(schedule, x)
    x0 = x
    for i in _indices(schedule, progress):
        eps = eps_model(x, ratios[i])
        (a, b), (a_prev, b_prev) = _scales(alphas[i]), _scales(alphas[i + 1])
        xw, ew = x.to(work), eps.to(work)
        pred = (xw - b * ew) / a
        sigma = eta * math.sqrt(b_prev**2 / b**2) * math.sqrt(max(1 - a**2 / a_prev**2, 0.0))
        step = a_prev * pred + math.sqrt(max(b_prev**2 - sigma**2, 0.0)) * ew
        if eta > 0:
            step = step + sigma * randn(x.shape, generator, device=x.device, dtype=eps.dtype).to(work)
        x0 = pred.to(x.dtype)
        x = _after_step(callback, i, schedule, step.to(x.dtype), x0)
    return SamplerResult(sample=x, x0=x0)


def euler_ancestral(
    eps_model: NoiseModel,
    x: Tensor,
    schedule: Schedule,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
    eta: float = 1.0,
) -> SamplerResult:
    """k-diffusion's ``sample_euler_ancestral`` in σ = b/a, x̃ = x/a, mapped back to x = a·x̃.

    Per step: σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)), σ_down = √(σ_next² − σ_up²),
    x̃_next = x0 + σ_down·ε + σ_up·z. A schedule ending at t = 0 ends at σ = 0: the last step returns
    the x0 prediction and draws no noise.
    """
    _check_eta(eta)
    schedule = schedule.to(x.device)
    alphas, times = schedule.alpha_cumprod.tolist(), schedule.t.tolist()
    work = _working_dtype(x)
    ratios = _ratios(schedule, x)
    x0 = x
    for i in _indices(schedule, progress):
        eps = eps_model(x, ratios[i])
        a, b = _scales(alphas[i])
        ew = eps.to(work)
        pred = (x.to(work) - b * ew) / a
        if times[i + 1] == 0:
            step = pred
        else:
            a_next, b_next = _scales(alphas[i + 1])
            down, up = _ancestral_step(b / a, b_next / a_next, eta)
            tilde = pred + down * ew
            if up > 0:
                tilde = tilde + up * randn(x.shape, generator, device=x.device, dtype=eps.dtype).to(work)
            step = a_next * tilde
        x0 = pred.to(x.dtype)
        x = _after_step(callback, i, schedule, step.to(x.dtype), x0)
    return SamplerResult(sample=x, x0=x0)


def dpmpp_2m(
    eps_model: NoiseModel,
    x: Tensor,
    schedule: Schedule,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
) -> SamplerResult:
    """k-diffusion's ``sample_dpmpp_2m`` (deterministic; ``generator`` is unused) in σ = b/a.

    With λ = −log σ = log(a/b), h = λ_next − λ and D the x0 prediction (second order from the
    previous one after the first step): x̃_next = (σ_next/σ)·x̃ − expm1(−h)·D, i.e. in x:
    x_next = (b_next/b)·x − a_next·expm1(−h)·D. A schedule ending at t = 0 ends at σ = 0: the last
    step returns the x0 prediction, as k-diffusion.
    """
    del generator  # deterministic sampler; the argument keeps the common signature
    schedule = schedule.to(x.device)
    alphas, times = schedule.alpha_cumprod.tolist(), schedule.t.tolist()
    work = _working_dtype(x)
    ratios = _ratios(schedule, x)
    x0 = x
    previous: tuple[Tensor, float] | None = None  # (x0 prediction, h) of the previous step
    for i in _indices(schedule, progress):
        eps = eps_model(x, ratios[i])
        a, b = _scales(alphas[i])
        xw = x.to(work)
        pred = (xw - b * eps.to(work)) / a
        if times[i + 1] == 0:
            step = pred
        else:
            a_next, b_next = _scales(alphas[i + 1])
            h = math.log(a_next / b_next) - math.log(a / b)
            denoised = pred
            if previous is not None and previous[1] > 0:  # first order after a start or a no-op step
                half_inverse_r = h / previous[1] / 2  # 1/(2r) with r = h_last/h
                denoised = (1 + half_inverse_r) * pred - half_inverse_r * previous[0]
            step = (b_next / b) * xw - a_next * math.expm1(-h) * denoised
            previous = (pred, h)
        x0 = pred.to(x.dtype)
        x = _after_step(callback, i, schedule, step.to(x.dtype), x0)
    return SamplerResult(sample=x, x0=x0)


def lcm(
    eps_model: NoiseModel,
    x: Tensor,
    schedule: Schedule,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
) -> SamplerResult:
    """Multistep consistency sampling, as the original ``gdf`` ``LCMSampler``: every step predicts
    x0 = (x − b·ε)/a and re-noises it with fresh noise to the next level, x_next = a_next·x0 + b_next·z;
    the last step returns x0 itself (and draws nothing). For a consistency-distilled model (``stable-cascade
    train lcm``): the x0 prediction is its consistency function, so a few steps suffice.
    """
    schedule = schedule.to(x.device)
    alphas = schedule.alpha_cumprod.tolist()
    work = _working_dtype(x)
    ratios = _ratios(schedule, x)
    x0 = x
    for i in _indices(schedule, progress):
        eps = eps_model(x, ratios[i])
        a, b = _scales(alphas[i])
        pred = (x.to(work) - b * eps.to(work)) / a
        if i == schedule.steps - 1:
            step = pred
        else:
            a_next, b_next = _scales(alphas[i + 1])
            noise = randn(x.shape, generator, device=x.device, dtype=eps.dtype).to(work)
            step = a_next * pred + b_next * noise
        x0 = pred.to(x.dtype)
        x = _after_step(callback, i, schedule, step.to(x.dtype), x0)
    return SamplerResult(sample=x, x0=x0)


SAMPLERS: dict[str, Callable[..., SamplerResult]] = {
    "ddpm": ddpm,
    "ddim": ddim,
    "euler_ancestral": euler_ancestral,
    "dpmpp_2m": dpmpp_2m,
    "lcm": lcm,
}
assert set(SAMPLERS) == set(SAMPLER_NAMES), "presets.SAMPLER_NAMES lists the samplers"


def get_sampler(name: str) -> Callable[..., SamplerResult]:
    """The sampler called ``name`` (one of :data:`SAMPLERS`)."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; expected one of {', '.join(sorted(SAMPLERS))}")
    return SAMPLERS[name]


def _indices(schedule: Schedule, progress: Progress | None) -> Iterable[int]:
    steps = range(schedule.steps)
    return steps if progress is None else progress(steps)


def _ratios(schedule: Schedule, x: Tensor) -> list[Tensor]:
    # Per step (B,) in x's dtype, as diffusers' pipelines pass ``t.expand(B).to(dtype)``: cast once.
    return [r.expand(x.shape[0]) for r in schedule.ratio[:-1].to(x.dtype).unbind()]


def _after_step(callback: StepCallback | None, i: int, schedule: Schedule, x: Tensor, x0: Tensor) -> Tensor:
    if callback is None:
        return x
    replaced = callback(i, schedule.t[i], x, x0)
    return x if replaced is None else replaced


def _ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """k-diffusion's ``get_ancestral_step``: (σ_down, σ_up) for a step from σ to σ_next."""
    up = min(sigma_next, eta * math.sqrt(max(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2, 0.0)))
    return math.sqrt(sigma_next**2 - up**2), up


def _scales(alpha: float) -> tuple[float, float]:
    """(a, b) = (√ᾱ, √(1−ᾱ)) in float64."""
    return math.sqrt(alpha), math.sqrt(1 - alpha)


def _working_dtype(x: Tensor) -> torch.dtype:
    # Step arithmetic in at least float32; the state between steps keeps x's dtype.
    return torch.promote_types(x.dtype, torch.float32)


def _check_eta(eta: float) -> None:
    if not eta >= 0:
        raise ValueError(f"eta must be >= 0 (0: deterministic, 1: ancestral), got {eta}")
