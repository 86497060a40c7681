"""The one sampling loop of both stages: a UNet, its conditioning, and the stage's settings.

Stage C and Stage B differ only in the conditioning dict they pass (``clip_text``/``clip_img`` for
C, ``effnet`` for B) and in their latent shape; everything else runs through :func:`run_stage`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

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
from stable_cascade.pipelines.compat import LoopControl
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


class PreparedUNet:
    """``eps(x, ratio)`` of ``unet`` with fixed conditioning (one row per row of ``x``) and optional
    ControlNet residuals (tiled over the rows; with guidance both branches get them).

    The step-invariant work (:meth:`StableCascadeUNet.prepare`) is done once, on the first call, for
    x's batch and size, and reused on every later step. With :meth:`StableCascadeUNet.enable_cuda_graphs`
    a guided step (both branches and the guidance arithmetic) is replayed as one graph.
    """

    def __init__(
        self, unet: StableCascadeUNet, conditioning: Conditioning, residuals: Sequence[Tensor | None] | None
    ) -> None:
        self.unet, self.conditioning, self.residuals = unet, conditioning, residuals
        self.cache: UNetCache | None = None
        self.steps: dict[tuple[float, float], Callable[[Tensor, Tensor, UNetCache], Tensor]] = {}

    def cache_for(self, rows: int, size: tuple[int, int]) -> UNetCache:
        if self.cache is None or self.cache.batch != rows or self.cache.size != size:
            self.cache = self.unet.prepare(size, controlnet_residuals=self.residuals, **self.conditioning)
        return self.cache

    def __call__(self, x: Tensor, ratio: Tensor) -> Tensor:
        cache = self.cache_for(x.shape[0], (x.shape[-2], x.shape[-1]))
        return self.unet(x, ratio, cache=cache, return_dict=False)[0]  # type: ignore[no-any-return]

    def guided(self, x: Tensor, ratio: Tensor, scale: float, rescale: float) -> Tensor:
        """The guided prediction for ``x`` (B, ...); the conditioning holds ``[cond; uncond]`` (2B rows)."""
        cache = self.cache_for(2 * x.shape[0], (x.shape[-2], x.shape[-1]))
        if (step := self.steps.get((scale, rescale))) is None:  # made once per guidance setting
            step = self.steps[scale, rescale] = guided_step(self.unet, scale, rescale)
        graphed = self.unet.graphed(("guided", scale, rescale), step, invariant=(2,))
        return (graphed or step)(x, ratio, cache)


def guided_step(
    unet: StableCascadeUNet, scale: float, rescale: float
) -> Callable[[Tensor, Tensor, UNetCache], Tensor]:
    """``step(x, ratio, cache)``: classifier-free guidance of ``unet`` with a cache of the doubled batch."""

    def step(x: Tensor, ratio: Tensor, cache: UNetCache) -> Tensor:
        def eps(doubled: Tensor, ratios: Tensor) -> Tensor:
            return unet(doubled, ratios, cache=cache, return_dict=False)[0]  # type: ignore[no-any-return]

        return classifier_free_guidance(eps, scale, rescale)(x, ratio)

    return step


def unet_noise_model(
    unet: StableCascadeUNet, conditioning: Conditioning, residuals: Sequence[Tensor | None] | None = None
) -> PreparedUNet:
    """``eps(x, ratio)`` of ``unet`` with fixed conditioning (see :class:`PreparedUNet`)."""
    return PreparedUNet(unet, conditioning, residuals)


class FiniteWatch:
    """A noise model that records the first step whose prediction holds NaN or Inf.

    The record stays on the device, so watching costs no host synchronisation per step;
    :func:`check_finite_run` reads it once, after sampling.
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


def stage_name(unet: StableCascadeUNet) -> str:
    return "Stage B (decoder)" if unet.config.is_stage_b else "Stage C (prior)"


def non_finite_error(unet: StableCascadeUNet, step: int | None, steps: int) -> FloatingPointError:
    """The one-line error of a stage that produced NaN/Inf: at ``step`` (0-based) of ``steps``, or in
    its result (``step=None``); the advice fits the stage, its dtype and its device."""
    stage = stage_name(unet)
    where = f"at step {step + 1} of {steps}" if step is not None else f"after {steps} steps"
    if unet.dtype != torch.float16:
        advice = "check its weights and any LoRA applied to it, or run it in torch.float32"
    elif not unet.config.is_stage_b and unet.fp16_safety is None:
        advice = (
            "float16 overflows in the full Stage C: call unet.enable_fp16_safety(), or use torch.bfloat16"
        )
    else:
        advice = f"{stage} overflows in float16 here; run it in torch.bfloat16 or torch.float32"
    if unet.dtype == torch.float16 and unet.device.type == "cpu":
        advice += " (on CPU, use torch.float32: float16 there is slow and imprecise)"
    return FloatingPointError(
        f"{stage} produced NaN/Inf {where} in {unet.dtype} on {unet.device.type}; {advice}"
    )


def guided_noise_model(
    unet: StableCascadeUNet,
    cond: Conditioning,
    uncond: Conditioning | None,
    rescale: float,
    control: LoopControl,
    residuals: Sequence[Tensor | None] | None = None,
) -> NoiseModel:
    """``unet`` guided with ``control.guidance_scale``, read before every step: a pipeline callback may
    change it (diffusers' ``pipe._guidance_scale = 0.0``); at most 1, the conditional branch runs alone."""
    both = (
        unet_noise_model(unet, guided_conditioning(cond, uncond, unet.dtype), residuals)
        if uncond is not None
        else None
    )
    alone = unet_noise_model(unet, guided_conditioning(cond, None, unet.dtype), residuals)

    def eps(x: Tensor, ratio: Tensor) -> Tensor:
        scale = control.guidance_scale
        if scale <= 1:
            return alone(x, ratio)
        if both is None:
            raise ValueError(
                f"guidance_scale was raised to {scale} during sampling, but the call ran without "
                "classifier-free guidance (no negative embeddings); pass guidance_scale > 1 to the call"
            )
        return both.guided(x, ratio, scale, rescale)

    return eps


def all_finite(*tensors: Tensor) -> Tensor:
    """A () bool tensor on the tensors' device: whether every value is finite (no host read)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def check_finite_run(
    unet: StableCascadeUNet,
    cond: Conditioning,
    inputs_finite: Tensor,
    watch: FiniteWatch,
    out: Tensor,
    steps: int,
) -> None:
    """Raise ``FloatingPointError`` naming the stage and the cause when the conditioning or starting
    latents (a broken encoder or LoRA upstream), a prediction, or the result held NaN/Inf.

    The three checks are read from the device in one go, after sampling.
    """
    first_bad = watch.first_bad if watch.first_bad is not None else torch.full((), -1, device=out.device)
    flags = torch.stack([~inputs_finite, first_bad.to(inputs_finite.device), ~torch.isfinite(out).all()])
    inputs_bad, bad_step, out_bad = (int(v) for v in flags.to(torch.int64).tolist())
    if inputs_bad:
        bad = sorted(name for name, value in cond.items() if not bool(torch.isfinite(value).all()))
        what = f"the conditioning of {stage_name(unet)} ({', '.join(bad)})" if bad else "the starting latents"
        raise FloatingPointError(
            f"{what} held NaN/Inf before sampling; check what made it (text or image encoder, the previous "
            "stage, the latents passed in), its weights and any LoRA applied to it"
        )
    if bad_step >= 0 or out_bad:
        raise non_finite_error(unet, bad_step if bad_step >= 0 else None, steps)


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
    control: LoopControl | None = None,
    residuals: Sequence[Tensor | None] | None = None,
) -> Tensor:
    """Sample one stage from ``latents`` and return what it hands on (final sample or last x0).

    ``uncond`` is the unconditional branch, required when ``settings.guidance_scale > 1``. With a
    clean ``init`` latent and ``strength`` < 1 (image-to-image), ``init`` is noised with ``latents``
    to the time ``round(steps · strength)`` steps before the end and only those steps run; no step
    left returns ``init``. ``strength == 1`` ignores ``init``: text-to-image, draw for draw.
    ``residuals``: ControlNet residuals for Stage C, used by both guidance branches.
    A prediction with NaN/Inf (e.g. float16 overflow) raises ``FloatingPointError`` after sampling,
    naming the stage, the first bad step and the dtype. ``control`` (a pipeline's) receives the
    guidance scale and the number of steps run, and may change the scale between steps.
    """
    if settings.guidance_scale > 1 and uncond is None:
        raise ValueError("classifier-free guidance needs the unconditional conditioning")
    control = control or LoopControl()
    control.guidance_scale = settings.guidance_scale
    eps = guided_noise_model(unet, cond, uncond, settings.guidance_rescale, control, residuals)
    guided = settings.guidance_scale > 1
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
    watch = FiniteWatch(eps)
    result = sampler(watch, latents, schedule, generator=generator, callback=callback, progress=progress)
    handed_on = result.x0 if settings.hand_on == "x0" else result.sample
    check_finite_run(unet, conditions, inputs_finite, watch, handed_on, schedule.steps)
    return handed_on
