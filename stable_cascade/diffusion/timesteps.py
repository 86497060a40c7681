"""Sampling schedules and the types shared by the samplers, guidance and the pipelines.

A :class:`Schedule` lists, from noisy to clean, the nominal time t, the variance-preserving ᾱ
(``x_t = √ᾱ·x0 + √(1−ᾱ)·ε``) and the timestep ratio the network is given. Two builders cover
Stable Cascade: :func:`diffusers_schedule` (diffusers' ``DDPMWuerstchenScheduler``) and
:func:`reference_schedule` (Stability's sampler with the logSNR shift).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from stable_cascade.diffusion.cosine import alpha_cumprod, noise_cond, reference_timesteps

#: ``eps_model(x (B, ...), ratio (B,)) -> ε (B, ...)``: a network predicting the noise.
NoiseModel = Callable[[Tensor, Tensor], Tensor]
#: ``callback(i, schedule.t[i], x after step i, x0 predicted at step i)``: a replacement for x, or
#: None to keep it.
StepCallback = Callable[[int, Tensor, Tensor, Tensor], Tensor | None]
#: Wraps the step indices, e.g. ``tqdm``; the identity by default.
Progress = Callable[[Iterable[int]], Iterable[int]]


@dataclass(frozen=True)
class Schedule:
    """The times a sampler steps through: step i goes from index i to index i + 1.

    ``alpha_cumprod_fn``, when set, is ᾱ as a function of the ratio (diffusers' schedule, where the
    ratio is the time t itself). :func:`~stable_cascade.diffusion.samplers.ddpm` then evaluates ᾱ_t
    at the ratio *as cast to the sample's dtype*, because diffusers' pipelines hand that cast ratio
    to ``scheduler.step``; this keeps ``ddpm`` bit-identical to them in bf16/fp16 too.
    """

    t: Tensor  # (steps + 1,) nominal times from noisy to clean
    alpha_cumprod: Tensor  # (steps + 1,) ᾱ at each time
    ratio: Tensor  # (steps + 1,) what the network receives at each time
    alpha_cumprod_fn: Callable[[Tensor], Tensor] | None = None

    def __post_init__(self) -> None:
        shapes = {tuple(v.shape) for v in (self.t, self.alpha_cumprod, self.ratio)}
        if len(shapes) != 1 or len(next(iter(shapes))) != 1 or self.t.shape[0] < 2:
            raise ValueError(
                "t, alpha_cumprod and ratio must be 1-D tensors of the same length >= 2 (steps + 1), "
                f"got shapes {tuple(self.t.shape)}, {tuple(self.alpha_cumprod.shape)}, "
                f"{tuple(self.ratio.shape)}"
            )

    @property
    def steps(self) -> int:
        """The number of sampling steps (one fewer than the times)."""
        return self.t.shape[0] - 1

    def tail(self, start: int) -> Schedule:
        """The schedule from index ``start`` on (image-to-image starts part-way, e.g. at t = 0.8)."""
        if not 0 <= start < self.steps:
            raise ValueError(f"start must be in [0, {self.steps - 1}] for {self.steps} steps, got {start}")
        kept = {name: getattr(self, name)[start:] for name in ("t", "alpha_cumprod", "ratio")}
        return dataclasses.replace(self, **kept)

    def to(self, device: torch.device | str | None) -> Schedule:
        """This schedule with its tensors on ``device``."""
        moved = {name: getattr(self, name).to(device) for name in ("t", "alpha_cumprod", "ratio")}
        return dataclasses.replace(self, **moved)


@dataclass
class SamplerResult:
    """What every sampler returns."""

    sample: Tensor  # the final x
    x0: Tensor  # the x0 prediction of the last step (what the reference sampler hands on)


def diffusers_timesteps(
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """``linspace(1, 0, num_inference_steps + 1)`` or the custom ``timesteps``, as diffusers sets them.

    Exactly one of the two is required. Custom timesteps must be strictly decreasing values in
    [0, 1]; like diffusers' own, they are stored as float32.
    """
    if (num_inference_steps is None) == (timesteps is None):
        raise ValueError(
            "pass exactly one of num_inference_steps and timesteps, got "
            f"num_inference_steps={num_inference_steps!r}, timesteps={timesteps!r}"
        )
    if timesteps is not None:
        return _checked_timesteps(timesteps).to(device)
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
        raise TypeError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    return torch.linspace(1.0, 0.0, num_inference_steps + 1, device=device)


def diffusers_schedule(
    num_inference_steps: int | None = None,
    timesteps: Sequence[float] | Tensor | None = None,
    s: float = 0.008,
    scaler: float = 1.0,
    device: torch.device | str | None = None,
) -> Schedule:
    """diffusers' ``DDPMWuerstchenScheduler`` schedule: its timesteps, ᾱ(t) and ``ratio = t``."""
    t = diffusers_timesteps(num_inference_steps, timesteps, device)
    fn = functools.partial(alpha_cumprod, s=s, scaler=scaler)
    return Schedule(t=t, alpha_cumprod=fn(t), ratio=t, alpha_cumprod_fn=fn)


def reference_schedule(
    steps: int,
    shift: float = 1.0,
    t_start: float = 1.0,
    s: float = 0.008,
    device: torch.device | str | None = None,
) -> Schedule:
    """Stability's reference schedule over ``linspace(t_start, 0, steps + 1)``.

    ᾱ = sigmoid(logSNR) of the shifted, clamped logSNR and ``ratio = noise_cond(logSNR)``, in float32
    as the original notebooks (Stage C: shift 2, 20 steps; Stage B: shift 1, 10 steps; img2img:
    ``t_start=0.8``).
    """
    reference = reference_timesteps(steps, shift=shift, t_start=t_start, s=s, device=device)
    return Schedule(
        t=reference.t, alpha_cumprod=reference.logsnr.sigmoid(), ratio=noise_cond(reference.logsnr, s)
    )


def _checked_timesteps(timesteps: Sequence[float] | Tensor) -> Tensor:
    """Custom timesteps as a float32 tensor, after checking they form a valid schedule."""
    values = torch.as_tensor(timesteps, dtype=torch.float32)
    if values.ndim != 1 or values.shape[0] < 2:
        shape = tuple(values.shape)
        raise ValueError(f"timesteps must be a 1-D sequence of at least 2 values, got shape {shape}")
    host = values.detach().cpu()
    if not bool(((host >= 0) & (host <= 1)).all()):
        raise ValueError(f"timesteps must lie in [0, 1], got {host.tolist()}")
    if not bool((host[1:] < host[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing (e.g. 1.0, 0.5, 0.0), got {host.tolist()}")
    return values
