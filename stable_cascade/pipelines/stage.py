"""The one sampling loop of both stages: a UNet, its conditioning, and the stage's settings.

Stage C and Stage B differ only in the conditioning dict they pass (``clip_text``/``clip_img`` for
C, ``effnet`` for B) and in their latent shape; everything else runs through :func:`run_stage`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from stable_cascade.diffusion.guidance import classifier_free_guidance
from stable_cascade.diffusion.noise import Generators, randn
from stable_cascade.diffusion.samplers import get_sampler
from stable_cascade.diffusion.sampling import (
    NoiseModel,
    Progress,
    Schedule,
    StepCallback,
    diffusers_schedule,
    reference_schedule,
)
from stable_cascade.nn.unet import StableCascadeUNet, UNetCache
from stable_cascade.pipelines.presets import StageSettings
from stable_cascade.specs import SchedulerConfig

Conditioning = Mapping[str, Tensor]


def build_schedule(settings: StageSettings, scheduler: SchedulerConfig, device: torch.device) -> Schedule:
    if settings.schedule == "reference":
        return reference_schedule(
            settings.num_inference_steps, shift=settings.shift, s=scheduler.s, device=device
        )
    steps = None if settings.timesteps is not None else settings.num_inference_steps
    return diffusers_schedule(
        steps, settings.timesteps, s=scheduler.s, scaler=scheduler.scaler, device=device
    )


def unet_noise_model(
    unet: StableCascadeUNet, conditioning: Conditioning, control: Sequence[Tensor | None] | None = None
) -> NoiseModel:
    """``eps(x, ratio)`` of ``unet`` with fixed conditioning (one row per row of ``x``) and optional
    ControlNet residuals (tiled over the rows; with guidance both branches get them).

    The step-invariant work (:meth:`StableCascadeUNet.prepare`) is done once, on the first call, for
    x's batch and size, and reused on every later step.
    """
    cache: UNetCache | None = None

    def eps(x: Tensor, ratio: Tensor) -> Tensor:
        nonlocal cache
        if cache is None or cache.batch != x.shape[0] or cache.size != tuple(x.shape[-2:]):
            cache = unet.prepare(x.shape[-2:], controlnet_residuals=control, **conditioning)
        return unet(x, ratio, cache=cache, return_dict=False)[0]

    return eps


class FiniteWatch:
    """A noise model that records the first step whose prediction holds NaN or Inf.

    The record stays on the device, so watching costs no host synchronisation per step;
    :meth:`first_bad_step` reads it once, after sampling.
    """

    def __init__(self, eps_model: NoiseModel) -> None:
        self.eps_model = eps_model
        self.calls = 0
        self.first_bad: Tensor | None = None  # () int64 step index, -1 while every step is finite

    def __call__(self, x: Tensor, ratio: Tensor) -> Tensor:
        eps = self.eps_model(x, ratio)
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.int64, device=eps.device)
        bad = ~torch.isfinite(eps).all() & (self.first_bad < 0)
        self.first_bad = torch.where(bad, self.calls, self.first_bad)
        self.calls += 1
        return eps

    def first_bad_step(self) -> int | None:
        """The index of the first non-finite prediction, or None."""
        if self.first_bad is None or (step := int(self.first_bad)) < 0:
            return None
        return step


def non_finite_error(unet: StableCascadeUNet, step: int, steps: int) -> FloatingPointError:
    stage = "Stage B (decoder)" if unet.config.is_stage_b else "Stage C (prior)"
    advice = (
        "float16 overflows in the full Stage C unless unet.enable_fp16_safety() is on; use "
        "torch.bfloat16 or torch.float32"
        if unet.dtype == torch.float16
        else "check the weights and inputs, or try torch.float32"
    )
    return FloatingPointError(
        f"{stage} predicted NaN/Inf noise at step {step + 1} of {steps} in {unet.dtype}; {advice}"
    )


def guided_conditioning(cond: Conditioning, uncond: Conditioning | None, dtype: torch.dtype) -> Conditioning:
    """``[cond; uncond]`` batched as diffusers does (conditional first), cast to the UNet's dtype."""
    if uncond is None:
        return {k: v.to(dtype) for k, v in cond.items()}
    return {k: torch.cat([v, uncond[k]]).to(dtype) for k, v in cond.items()}


def initial_latents(
    shape: tuple[int, ...],
    latents: Tensor | None,
    generator: Generators | None,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """Fresh noise (drawn as diffusers draws it) or the caller's latents after a shape check."""
    if latents is None:
        return randn(shape, generator, device=device, dtype=dtype)
    if tuple(latents.shape) != shape:
        raise ValueError(
            f"latents must have shape {shape} for this batch and size, got {tuple(latents.shape)}; "
            "omit latents to draw them from the generator"
        )
    return latents.to(device=device, dtype=dtype)


def run_stage(
    unet: StableCascadeUNet,
    cond: Conditioning,
    uncond: Conditioning | None,
    latents: Tensor,
    settings: StageSettings,
    scheduler: SchedulerConfig,
    generator: Generators | None = None,
    callback: StepCallback | None = None,
    progress: Progress | None = None,
    init: Tensor | None = None,
    strength: float = 1.0,
    control: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Sample one stage from ``latents`` and return what it hands on (final sample or last x0).

    ``uncond`` is the unconditional branch, required when ``settings.guidance_scale > 1``. With a
    clean ``init`` latent and ``strength`` < 1 (image-to-image), ``init`` is noised with ``latents``
    to the time ``round(steps · strength)`` steps before the end and only those steps run; no step
    left returns ``init``. ``strength == 1`` ignores ``init``: text-to-image, draw for draw.
    ``control``: ControlNet residuals for Stage C, used by both guidance branches.
    A prediction with NaN/Inf (e.g. float16 overflow) raises ``FloatingPointError`` after sampling,
    naming the stage, the first bad step and the dtype.
    """
    guided = settings.guidance_scale > 1
    if guided and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional conditioning")
    conditioning = guided_conditioning(cond, uncond if guided else None, unet.dtype)
    eps = unet_noise_model(unet, conditioning, control)
    eps = classifier_free_guidance(eps, settings.guidance_scale, settings.guidance_rescale)
    schedule = build_schedule(settings, scheduler, latents.device)
    if init is not None and strength < 1:
        start = schedule.steps - round(schedule.steps * strength)
        if start == schedule.steps:
            return init.to(latents.dtype)
        alpha = schedule.alpha_cumprod[start].to(latents.dtype)
        latents = alpha.sqrt() * init.to(latents.dtype) + (1 - alpha).sqrt() * latents
        schedule = schedule.tail(start)
    sampler = get_sampler(settings.sampler)
    watch = FiniteWatch(eps)
    result = sampler(watch, latents, schedule, generator=generator, callback=callback, progress=progress)
    if (bad := watch.first_bad_step()) is not None:
        raise non_finite_error(unet, bad, schedule.steps)
    return result.x0 if settings.hand_on == "x0" else result.sample
