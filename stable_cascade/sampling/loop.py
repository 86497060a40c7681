"""The one sampling loop of both stages: a UNet, its conditioning, and the stage's settings.

Stage C and Stage B differ only in the conditioning dict they pass (``clip_text``/``clip_img`` for
C, ``effnet`` for B) and in their latent shape; everything else runs through :func:`run_stage`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor

from stable_cascade.diffusion.noise import Generators, randn
from stable_cascade.diffusion.presets import StageSettings
from stable_cascade.diffusion.samplers import get_sampler
from stable_cascade.diffusion.timesteps import (
    Progress,
    Schedule,
    StepCallback,
    diffusers_schedule,
    reference_schedule,
)
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.sampling.finite import FiniteWatch, all_finite, check_finite_run
from stable_cascade.sampling.noise_model import Conditioning, LoopControl, guided_noise_model
from stable_cascade.sampling.phases import phase, timed_steps
from stable_cascade.specs import SchedulerConfig


def build_schedule(settings: StageSettings, scheduler: SchedulerConfig, device: torch.device) -> Schedule:
    if settings.schedule == "reference":
        return reference_schedule(settings.steps, shift=settings.shift, s=scheduler.s, device=device)
    steps = None if settings.timesteps is not None else settings.steps
    return diffusers_schedule(
        steps, settings.timesteps, s=scheduler.s, scaler=scheduler.scaler, device=device
    )


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
    if not isinstance(latents, Tensor) or not latents.is_floating_point():
        what = latents.dtype if isinstance(latents, Tensor) else type(latents).__name__
        raise TypeError(f"latents must be a floating-point tensor of shape {shape}, got {what}")
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
    control: LoopControl | None = None,
    residuals: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Sample one stage from ``latents`` and return what it hands on (final sample or last x0).

    ``uncond`` is the unconditional branch, required when ``settings.guidance > 1``. With a
    clean ``init`` latent and ``strength`` < 1 (image-to-image), ``init`` is noised with ``latents``
    to the time ``round(steps · strength)`` steps before the end and only those steps run; no step
    left returns ``init``. ``strength == 1`` ignores ``init``: text-to-image, draw for draw.
    ``residuals``: ControlNet residuals for Stage C, used by both guidance branches. A UNet with a
    guidance embedding (an LCM-distilled stage) takes ``settings.guidance`` as that input instead.
    A prediction with NaN/Inf (e.g. float16 overflow) raises ``FloatingPointError`` after sampling,
    naming the stage, the first bad step and the dtype. ``control`` (a pipeline's) receives the
    guidance scale and the number of steps run, and may change the scale between steps.
    """
    if "guidance" in unet.config.timestep_conditioning_type:  # the scale is an input: one branch
        scale = torch.full((latents.shape[0],), float(settings.guidance), device=latents.device)
        cond, uncond, settings = (
            {**cond, "guidance": scale},
            None,
            dataclasses.replace(settings, guidance=1.0),
        )
    if settings.guidance > 1 and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional conditioning")
    stage = "Stage B" if unet.config.is_stage_b else "Stage C"
    with phase(f"{stage} set-up"):
        control = control or LoopControl()
        control.guidance_scale = settings.guidance
        eps = guided_noise_model(unet, cond, uncond, settings.rescale, control, residuals)
        guided = settings.guidance > 1
        negative = {f"negative {name}": value for name, value in (uncond or {}).items()} if guided else {}
        conditions = {**cond, **negative}
        inputs_finite = all_finite(*conditions.values(), latents, *(() if init is None else (init,)))
        schedule = build_schedule(settings, scheduler, latents.device)
        control.num_timesteps = schedule.steps
        if init is not None and strength < 1:
            start = schedule.steps - round(schedule.steps * strength)
            control.num_timesteps = schedule.steps - start
            if start == schedule.steps:
                return init.to(latents.dtype)
            alpha = schedule.alpha_cumprod[start].to(latents.dtype)
            latents = alpha.sqrt() * init.to(latents.dtype) + (1 - alpha).sqrt() * latents
            schedule = schedule.tail(start)
        sampler = get_sampler(settings.sampler)
        eps.prepare(latents)  # the UNet's step-invariant work, here rather than in the first step
        watch = FiniteWatch(eps)
    steps = timed_steps(stage, progress)
    result = sampler(watch, latents, schedule, generator=generator, callback=callback, progress=steps)
    handed_on = result.x0 if settings.hand_on == "x0" else result.sample
    with phase(f"{stage} NaN check"):
        check_finite_run(unet, conditions, inputs_finite, watch, handed_on, schedule.steps)
    return handed_on
