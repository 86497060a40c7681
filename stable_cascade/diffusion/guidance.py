"""Classifier-free guidance as a wrapper around a noise-predicting model (diffusers' and Stability's)."""

from __future__ import annotations

import torch
from torch import Tensor

from stable_cascade.diffusion.timesteps import NoiseModel


def classifier_free_guidance(eps_model: NoiseModel, scale: float, rescale: float = 0.0) -> NoiseModel:
    """``eps_model`` guided with ``scale``, optionally with the reference's CFG rescale ``rescale`` (ρ).

    ``scale <= 1`` returns ``eps_model`` itself: the caller then runs it on conditional inputs only
    (diffusers turns CFG on when ``guidance_scale > 1``). Otherwise the guided model calls
    ``eps_model`` once on the doubled batch ``cat([x, x])``; ``eps_model`` must hold the conditioning
    for that batch in the order ``[cond; uncond]``, as diffusers and the reference do. The result is
    ``p = lerp(ε_uncond, ε_cond, scale)`` (bit-identical to diffusers), then, for ρ > 0, the
    reference's rescale ``p = ρ·p·std(ε_cond)/(std(p) + 1e-9) + (1 − ρ)·p`` (Stability's
    ``GDF.sample``; their Stage C uses ρ = 0.7). The std is taken per sample (over all but the batch
    axis): Stability's code takes it over the whole batch tensor, which is the same for their batch
    of one but couples the images of a batch; per sample, image i of a batch equals a single run.
    """
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"rescale must be in [0, 1] (0: off, reference Stage C: 0.7), got {rescale}")
    if scale <= 1:
        return eps_model

    def guided(x: Tensor, ratio: Tensor) -> Tensor:
        # (2B, ...) → two (B, ...) halves: [cond; uncond].
        eps_cond, eps_uncond = eps_model(torch.cat([x, x]), torch.cat([ratio, ratio])).chunk(2)
        pred = torch.lerp(eps_uncond, eps_cond, scale)
        if rescale > 0:
            # The reference's operation order: ρ·(p·std_c/(std_p + 1e-9)) + p·(1 − ρ).
            dims = tuple(range(1, pred.ndim))
            std_cond, std_pred = eps_cond.std(dim=dims, keepdim=True), pred.std(dim=dims, keepdim=True)
            pred = rescale * (pred * std_cond / (std_pred + 1e-9)) + pred * (1 - rescale)
        return pred

    return guided
