"""The diffusion training objective of the original Stable Cascade (``gdf`` with the settings of
``train/train_c.py`` and ``train_b.py``), and the random condition dropout around it.

* ``t ~ U(0, 1)`` per sample; ``logSNR`` from the clamped cosine schedule (``CosineSchedule``,
  shift 1); variance preserving ``x_t = √σ(logSNR)·x0 + √σ(−logSNR)·ε`` (``VPScaler``);
* the UNet gets ``r = noise_cond(logSNR)`` (``CosineTNoiseCond``) and predicts ε (``EpsilonTarget``);
* loss: per sample ``mean((pred − ε)²)`` times a weight of its logSNR, averaged over the batch:
  ``P2LossWeight`` ``(1 + e^logSNR)^−1`` (the default) or ``AdaptiveLossWeight``, the inverse of a
  running mean of the loss in 300 logSNR buckets over [−10, 10];
* Stage B draws pyramid noise (``_pyramid_noise`` of ``train_b.py``; levels of side ≤ 16 by default).

Every random draw takes an explicit ``torch.Generator`` (a CPU one: device-independent results).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from stable_cascade.diffusion.cosine import logsnr as cosine_logsnr
from stable_cascade.diffusion.cosine import noise_cond
from stable_cascade.training.config import LossWeighting


@dataclasses.dataclass(frozen=True)
class Noised:
    """A noised batch and what the loss needs of it."""

    sample: Tensor  # (B, C, H, W) x_t
    noise: Tensor  # (B, C, H, W) ε, the target
    logsnr: Tensor  # (B,)
    r: Tensor  # (B,) the UNet's timestep_ratio, noise_cond(logSNR)


def uniform(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.rand(shape, generator=generator, device=generator.device)


def gaussian(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, device=generator.device)


def diffuse(x0: Tensor, generator: torch.Generator, noise: Tensor | None = None) -> Noised:
    """Noise ``x0`` (B, C, H, W) to a random level per sample (``GDF.diffuse`` with shift 1)."""
    b = x0.shape[0]
    noise = gaussian(tuple(x0.shape), generator) if noise is None else noise
    noise = noise.to(x0.device, torch.float32)
    snr = cosine_logsnr(uniform((b,), generator)).to(x0.device)  # (B,)
    a, s = snr.sigmoid().sqrt().view(b, 1, 1, 1), (-snr).sigmoid().sqrt().view(b, 1, 1, 1)
    sample = (a * x0.float() + s * noise).to(x0.dtype)
    return Noised(sample=sample, noise=noise, logsnr=snr, r=noise_cond(snr))


def pyramid_noise(
    shape: tuple[int, ...], generator: torch.Generator, max_side: int = 16, levels: int = 10
) -> Tensor:
    """Gaussian noise plus coarser noise upsampled (nearest), level i weighted 0.75^i, renormalised
    to unit variance; levels whose height or width is at most ``max_side`` are added (original:
    ``size_range=[1, 16]``; it measured both sides by the height, a slip not reproduced)."""
    b, c, h, w = shape
    noise = gaussian(shape, generator)
    total = 1.0
    for level in range(1, levels):
        weight = 0.75**level
        hl, wl = h // 2**level, w // 2**level
        if hl < 1 or wl < 1:
            break
        if hl <= max_side or wl <= max_side:
            coarse = gaussian((b, c, hl, wl), generator)
            noise = noise + torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest") * weight
            total += weight**2
        if hl <= 1 or wl <= 1:
            break
    return noise / math.sqrt(total)


def epsilon_loss(prediction: Tensor, noise: Tensor) -> Tensor:
    """(B,) mean squared error of each sample, in float32."""
    return (prediction.float() - noise.float()).pow(2).flatten(1).mean(dim=1)


def keep(count: int, probability: float, generator: torch.Generator) -> Tensor:
    """(count,) bool: each True with ``probability``."""
    return uniform((count,), generator) < probability


def drop_captions(captions: list[str], probability: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by ``""`` with ``probability`` (original: 5 %, the unconditional input)."""
    kept = keep(len(captions), 1.0 - probability, generator).tolist()
    return [caption if k else "" for caption, k in zip(captions, kept, strict=True)]


class LossWeights:
    """Per-sample loss weights of their logSNR: P2, adaptive or none (all ones).

    Adaptive (``AdaptiveLossWeight``): 300 buckets split [−10, 10]; a sample's weight is 1 / its
    bucket's running loss (clamped to [1e-7, 1e7]); after each step every sample's raw loss updates
    its bucket, ``b ← 0.99·b + 0.01·loss``, one sample after the other (the original wrote all at once,
    so of several samples in one bucket only one counted). The buckets are state: saved with every
    checkpoint, and identical on every process (they are updated from the gathered losses).
    """

    BUCKETS = 300
    LOGSNR_RANGE = (-10.0, 10.0)
    BETA = 0.99
    WEIGHT_RANGE = (1e-7, 1e7)

    def __init__(self, kind: LossWeighting) -> None:
        self.kind = kind
        self.edges = torch.linspace(*self.LOGSNR_RANGE, self.BUCKETS - 1)
        self.losses = torch.ones(self.BUCKETS)

    def __call__(self, logsnr: Tensor) -> Tensor:
        """(B,) weights for (B,) logSNR."""
        if self.kind == "p2":
            return 1.0 / (1.0 + logsnr.float().exp())  # P2LossWeight(k=1, gamma=1, s=1)
        if self.kind == "none":
            return torch.ones_like(logsnr, dtype=torch.float32)
        buckets = torch.searchsorted(self.edges, logsnr.detach().float().cpu())
        return (1.0 / self.losses[buckets]).clamp(*self.WEIGHT_RANGE).to(logsnr.device)

    def update(self, logsnr: Tensor, loss: Tensor) -> None:
        """Record the raw per-sample losses (adaptive weighting only)."""
        if self.kind != "adaptive":
            return
        buckets = torch.searchsorted(self.edges, logsnr.detach().float().cpu()).tolist()
        for bucket, value in zip(buckets, loss.detach().float().cpu().tolist(), strict=True):
            self.losses[bucket] = self.losses[bucket] * self.BETA + value * (1 - self.BETA)

    def state_dict(self) -> dict[str, Tensor]:
        return {"bucket_losses": self.losses.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        losses = state["bucket_losses"]
        if losses.shape != self.losses.shape:
            raise ValueError(
                f"adaptive loss buckets: expected {tuple(self.losses.shape)}, got {tuple(losses.shape)}"
            )
        self.losses = losses.clone().float()
