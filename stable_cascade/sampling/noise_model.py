"""The noise model a stage samples with: its UNet with the conditioning prepared once, and guided.

:class:`PreparedUNet` does the step-invariant work of :meth:`StableCascadeUNet.prepare` once per run;
:func:`guided_noise_model` adds classifier-free guidance with a scale read before every step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from stable_cascade.diffusion.guidance import classifier_free_guidance
from stable_cascade.nn.unet import StableCascadeUNet, UNetCache

Conditioning = Mapping[str, Tensor]


@dataclasses.dataclass
class LoopControl:
    """What a pipeline's sampling loop shares with its callbacks: the guidance scale, which a callback
    may change between steps (``pipe._guidance_scale = 0.0`` turns CFG off), and the steps run."""

    guidance_scale: float = 1.0
    num_timesteps: int = 0


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


class GuidedNoiseModel:
    """``eps(x, ratio)`` of a UNet guided with ``control.guidance_scale``, read before every step: a
    pipeline callback may change it (diffusers' ``pipe._guidance_scale = 0.0``); at most 1, the
    conditional branch runs alone. :meth:`prepare` does the step-invariant work ahead of the loop."""

    def __init__(
        self, alone: PreparedUNet, both: PreparedUNet | None, rescale: float, control: LoopControl
    ) -> None:
        self.alone, self.both, self.rescale, self.control = alone, both, rescale, control

    def prepare(self, x: Tensor) -> None:
        """Prepare the UNet's cache for x (B, ...) and the branches the current guidance scale runs."""
        size = (x.shape[-2], x.shape[-1])
        if self.control.guidance_scale > 1 and self.both is not None:
            self.both.cache_for(2 * x.shape[0], size)
        else:
            self.alone.cache_for(x.shape[0], size)

    def __call__(self, x: Tensor, ratio: Tensor) -> Tensor:
        scale = self.control.guidance_scale
        if scale <= 1:
            return self.alone(x, ratio)
        if self.both is None:
            raise ValueError(
                f"guidance_scale was raised to {scale} during sampling, but the call ran without "
                "classifier-free guidance (no negative embeddings); pass guidance_scale > 1 to the call"
            )
        return self.both.guided(x, ratio, scale, self.rescale)


def guided_noise_model(
    unet: StableCascadeUNet,
    cond: Conditioning,
    uncond: Conditioning | None,
    rescale: float,
    control: LoopControl,
    residuals: Sequence[Tensor | None] | None = None,
) -> GuidedNoiseModel:
    """``unet`` guided with ``control.guidance_scale`` (see :class:`GuidedNoiseModel`); ``uncond``:
    the unconditional branch (None: guidance cannot be turned on)."""
    both = (
        unet_noise_model(unet, guided_conditioning(cond, uncond, unet.dtype), residuals)
        if uncond is not None
        else None
    )
    alone = unet_noise_model(unet, guided_conditioning(cond, None, unet.dtype), residuals)
    return GuidedNoiseModel(alone, both, rescale, control)


def guided_conditioning(cond: Conditioning, uncond: Conditioning | None, dtype: torch.dtype) -> Conditioning:
    """``[cond; uncond]`` batched as diffusers does (conditional first), cast to the UNet's dtype."""
    if uncond is None:
        return {k: v.to(dtype) for k, v in cond.items()}
    return {k: torch.cat([v, uncond[k]]).to(dtype) for k, v in cond.items()}
