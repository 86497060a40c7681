"""Latent consistency distillation on Stable Cascade's continuous schedule, as pure functions.

The recipe is diffusers' LCM distillation (``train_lcm_distill_*``) moved from 1000 DDPM steps to the
continuous time t ∈ [0, 1] of the training objective (``objective.py``: the clamped cosine logSNR,
variance preserving, ε-prediction, the UNet given ``r = noise_cond(logSNR)``):

* the teacher's grid holds N + 1 times ``t_n = n / N``; an example starts at a random ``t_n`` (n ≥ 1)
  and the teacher's guided DDIM step (η = 0) takes it one grid step back, to ``t_{n-1}`` (diffusers:
  skip 20 of 1000 on a 50-step grid: one step of it);
* guidance per example, ``ε = ε_u + w·(ε_c − ε_u)`` (this package's CFG scale, 1: none);
* the consistency function is ``f(x, t) = c_skip(t)·x + c_out(t)·x̂0(x, t)`` with diffusers' boundary
  terms (σ_data 0.5, timestep scaling 10 in 1000-step units: ``10 000·t`` here), the identity at
  t = 0; the student's f at ``t_n`` learns the target's f at ``t_{n-1}``;
* distance: pseudo-Huber ``√((f − f*)² + c²) − c`` (diffusers' c 0.001) or squared error, averaged
  per example.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from stable_cascade.diffusion.cosine import logsnr as cosine_logsnr
from stable_cascade.diffusion.cosine import noise_cond

SIGMA_DATA = 0.5
TIMESTEP_SCALING = 10_000.0  # diffusers' 10 per DDPM step, 1000 steps per unit of t


@dataclasses.dataclass(frozen=True)
class Level:
    """Per example: the time, the scales of ``x_t = a·x0 + b·ε`` and the UNet's ratio."""

    t: Tensor  # (B,)
    a: Tensor  # (B, 1, 1, 1)
    b: Tensor  # (B, 1, 1, 1)
    r: Tensor  # (B,)

    @classmethod
    def at(cls, t: Tensor) -> Level:
        """The level of times ``t`` (B,) on the training schedule (shift 1)."""
        snr = cosine_logsnr(t.float())
        view = (-1, 1, 1, 1)
        return cls(
            t=t.float(),
            a=snr.sigmoid().sqrt().view(view),
            b=(-snr).sigmoid().sqrt().view(view),
            r=noise_cond(snr),
        )

    def to(self, device: torch.device) -> Level:
        return Level(self.t.to(device), self.a.to(device), self.b.to(device), self.r.to(device))

    def noised(self, x0: Tensor, noise: Tensor) -> Tensor:
        return self.a * x0 + self.b * noise

    def x0(self, x: Tensor, eps: Tensor) -> Tensor:
        """x̂0 = (x − b·ε)/a."""
        return (x - self.b * eps) / self.a

    def boundary(self) -> tuple[Tensor, Tensor]:
        """(c_skip, c_out), each (B, 1, 1, 1): 1 and 0 at t = 0."""
        scaled = TIMESTEP_SCALING * self.t.view(-1, 1, 1, 1)
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2).sqrt()
        return c_skip, c_out

    def consistency(self, x: Tensor, eps: Tensor) -> Tensor:
        """f(x, t) = c_skip·x + c_out·x̂0."""
        c_skip, c_out = self.boundary()
        return c_skip * x + c_out * self.x0(x, eps)


def grid_pair(batch: int, steps: int, generator: torch.Generator) -> tuple[Level, Level]:
    """Random start levels ``t_n`` (n uniform in 1..N) and the levels one grid step earlier."""
    n = torch.randint(1, steps + 1, (batch,), generator=generator, device=generator.device).float()
    return Level.at(n / steps), Level.at((n - 1) / steps)


def guidance_scales(batch: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """(B,) CFG scales drawn uniformly from [low, high]."""
    return low + (high - low) * torch.rand(batch, generator=generator, device=generator.device)


def guided(eps_cond: Tensor, eps_uncond: Tensor, scale: Tensor) -> Tensor:
    """``ε_u + w·(ε_c − ε_u)`` with one scale per example."""
    return torch.lerp(eps_uncond, eps_cond, scale.view(-1, 1, 1, 1).to(eps_cond.dtype))


def ddim_step(x: Tensor, eps: Tensor, level: Level, earlier: Level) -> Tensor:
    """The deterministic DDIM step (η = 0) from ``level`` to ``earlier``: a'·x̂0 + b'·ε."""
    return earlier.a * level.x0(x, eps) + earlier.b * eps


def distance(prediction: Tensor, target: Tensor, kind: str, huber_c: float) -> Tensor:
    """(B,) pseudo-Huber (``huber``) or squared (``l2``) distance per example, in float32."""
    difference = prediction.float() - target.float()
    if kind == "l2":
        return difference.pow(2).flatten(1).mean(dim=1)
    return ((difference.pow(2) + huber_c**2).sqrt() - huber_c).flatten(1).mean(dim=1)
