"""Live previews of Stage C sampling: each step's x0 estimate as RGB images.

    previews = PreviewCallback(every=5)
    prior(prompt, callback_on_step_end=previews, callback_on_step_end_tensor_inputs=previews.tensor_inputs)
    previews.images  # one list of PIL images per previewed step

With a :class:`~stable_cascade.nn.previewer.Previewer` (the pipeline's ``previewer`` component, or
one given here) the preview is its 8× upsampled RGB decode; without one, a cheap linear projection
of the 16 latent channels onto their first three principal components, per image.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import PIL.Image
import torch
from torch import Tensor

from stable_cascade.nn.previewer import Previewer
from stable_cascade.pipelines.outputs import postprocess


def principal_components_rgb(latent: Tensor) -> Tensor:
    """(B, C, h, w) → (B, 3, h, w) in [0, 1]: each image's channels projected on their top 3 PCs."""
    b, _, h, w = latent.shape
    pixels = latent.float().flatten(2).transpose(1, 2)  # (B, h·w, C)
    centred = pixels - pixels.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)  # vh: (B, min(hw, C), C)
    basis = vh[:, :3].transpose(1, 2)  # (B, C, k), k ≤ 3
    projected = centred @ basis  # (B, h·w, k)
    if projected.shape[-1] < 3:  # fewer pixels than 3: pad with grey
        projected = torch.nn.functional.pad(projected, (0, 3 - projected.shape[-1]))
    low, high = projected.amin(dim=1, keepdim=True), projected.amax(dim=1, keepdim=True)
    rgb = (projected - low) / (high - low).clamp_min(1e-8)
    return rgb.transpose(1, 2).reshape(b, 3, h, w)


def latent_to_rgb(latent: Tensor, previewer: Previewer | None = None) -> Tensor:
    """Stage C latents (B, 16, h, w) → RGB previews in [0, 1] (8× larger with a previewer)."""
    if previewer is None:
        return principal_components_rgb(latent)
    return previewer.preview(latent.to(previewer.device, previewer.dtype)).float()


class PreviewCallback:
    """A ``callback_on_step_end`` that stores (and optionally hands on) a preview every ``every`` steps."""

    tensor_inputs = ("denoised",)

    def __init__(
        self,
        previewer: Previewer | None = None,
        every: int = 1,
        on_preview: Callable[[int, list[PIL.Image.Image]], None] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.previewer = previewer
        self.every = every
        self.on_preview = on_preview
        self.images: list[list[PIL.Image.Image]] = []

    def __call__(self, pipeline: Any, step: int, timestep: Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
        if "denoised" not in tensors:
            raise ValueError(
                "PreviewCallback needs the x0 estimate: pass "
                "callback_on_step_end_tensor_inputs=PreviewCallback.tensor_inputs"
            )
        if step % self.every == 0:
            previewer = self.previewer or getattr(pipeline, "previewer", None)
            images = postprocess(latent_to_rgb(tensors["denoised"], previewer).cpu(), "pil")
            assert isinstance(images, list)
            self.images.append(images)
            if self.on_preview is not None:
                self.on_preview(step, images)
        return {}
