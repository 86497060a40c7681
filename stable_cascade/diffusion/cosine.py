"""Stable Cascade's cosine noise schedule as pure functions over tensors.

``alpha_cumprod`` is the clamped cosine ᾱ(t) that diffusers' ``DDPMWuerstchenScheduler`` uses;
``logsnr``, ``noise_cond`` and ``reference_timesteps`` are the log-SNR schedule with shift and the
network condition ``r`` of Stability's original sampler. Every function computes in
the input's dtype promoted to at least float32 (float64 stays float64) on the input's device; in
float32 the operation order is the references', so results are bit-identical to them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

#: ᾱ is clamped to this range by both references.
ALPHA_CUMPROD_RANGE = (1e-4, 0.9999)


def _working(x: Tensor | float, device: torch.device | str | None = None) -> Tensor:
    """``x`` as a tensor of at least float32 precision (bf16/fp16/int become float32)."""
    x = torch.as_tensor(x, device=device)
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _cos2(x: Tensor) -> Tensor:
    # cos(x·π/2)²; x·(π/2) rounds like the references' x·π·0.5 since halving is exact.
    return torch.cos(x * (math.pi / 2)) ** 2


def _s_like(s: float, like: Tensor) -> Tensor:
    # A tensor, not a Python float: 1 + s must round in the working dtype as the references do.
    return torch.tensor(s, dtype=like.dtype, device=like.device)


def alpha_cumprod(t: Tensor | float, s: float = 0.008, scaler: float = 1.0) -> Tensor:
    """ᾱ(t) = cos²((t+s)/(1+s)·π/2) / cos²(s/(1+s)·π/2), clamped to [1e-4, 0.9999].

    Matches diffusers ``DDPMWuerstchenScheduler``, including its ``scaler`` warp of t
    (scaler > 1: ``1 - (1-t)**scaler``; scaler < 1: ``t**scaler``).
    """
    t = torch.as_tensor(t)
    # The warp runs in t's own dtype (bf16 timesteps warp in bf16), as in diffusers.
    if scaler > 1:
        t = 1 - (1 - t) ** scaler
    elif scaler < 1:
        t = t**scaler
    t = _working(t)
    s_t = _s_like(s, t)
    return (_cos2((t + s_t) / (1 + s_t)) / _cos2(s_t / (1 + s_t))).clamp(*ALPHA_CUMPROD_RANGE)


def _unshifted_logsnr(t: Tensor, s: float) -> Tensor:
    alpha = alpha_cumprod(t.clamp(0, 1), s)
    return (alpha / (1 - alpha)).log()


def logsnr(t: Tensor | float, s: float = 0.008, shift: float = 1.0) -> Tensor:
    """log(ᾱ/(1−ᾱ)) of the clamped cosine ᾱ, plus ``2·ln(1/shift)``, clamped to the unshifted limits.

    As the original ``CosineSchedule``: t is clamped to [0, 1]; the limits are the unshifted logSNR at
    t = 1 and t = 0 in the working dtype (float32: [-9.21024, 9.21007], the upper one a float32
    rounding artefact of 1 - 0.9999; float64: ±9.21024).
    """
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    t = _working(t)
    value = _unshifted_logsnr(t, s)
    if shift == 1:
        return value
    limits = _unshifted_logsnr(torch.tensor([1.0, 0.0], dtype=t.dtype, device=t.device), s)
    return (value + 2 * math.log(1 / shift)).clamp(limits[0], limits[1])


def noise_cond(logsnr: Tensor | float, s: float = 0.008) -> Tensor:
    """The condition ``r`` the network receives: the t whose unshifted ᾱ has this logSNR, in [0, 1].

    As the original ``CosineTNoiseCond``: ``v = sigmoid(logSNR)``,
    ``r = acos(√(v·ᾱ_min))/(π/2)·(1+s) − s`` with ``ᾱ_min = cos²(s/(1+s)·π/2)``, clamped to [0, 1].
    """
    variance = _working(logsnr).sigmoid().clamp(0, 1)
    s_t = _s_like(s, variance)
    r = (variance * _cos2(s_t / (1 + s_t))).sqrt().acos() / (math.pi / 2) * (1 + s_t) - s_t
    return r.clamp(0, 1)


@dataclass(frozen=True)
class ReferenceTimesteps:
    """The reference sampler's schedule for ``steps`` steps from ``t[0]`` to ``t[-1]``.

    Step i denoises from ``logsnr[i]`` to ``logsnr[i + 1]`` and gives the network ``r[i]``.
    Iterating yields ``(r[i], logsnr[i], logsnr[i + 1])`` per step.
    """

    t: Tensor  # (steps + 1,) linspace(t_start, t_end, steps + 1)
    logsnr: Tensor  # (steps + 1,) shifted and clamped
    r: Tensor  # (steps,) noise_cond(logsnr[:-1])

    def __len__(self) -> int:
        return self.r.shape[0]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        return iter(zip(self.r, self.logsnr[:-1], self.logsnr[1:], strict=True))


def reference_timesteps(
    steps: int,
    shift: float = 1.0,
    t_start: float = 1.0,
    t_end: float = 0.0,
    s: float = 0.008,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> ReferenceTimesteps:
    """The per-step logSNR and ``r`` of the original sampler: ``linspace(t_start, t_end, steps + 1)``.

    float32 (the default) reproduces the original notebooks' values; e.g. Stage C (shift 2, 20 steps)
    starts at logSNR −9.2102, r 0.99358 and Stage B (shift 1, 10 steps) has r = 0.99358, 0.9, …, 0.1.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not 0.0 <= t_end < t_start <= 1.0:
        raise ValueError(f"need 0 <= t_end < t_start <= 1, got t_start={t_start}, t_end={t_end}")
    t = torch.linspace(t_start, t_end, steps + 1, device=device, dtype=dtype)
    values = logsnr(t, s, shift)
    return ReferenceTimesteps(t=t, logsnr=values, r=noise_cond(values[:-1], s))
