"""Pipeline outputs (diffusers-compatible dataclasses) and image post-processing."""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np
import PIL.Image
import torch
from torch import Tensor

OutputType = Literal["pt", "np", "pil", "latent"]
Images = list[PIL.Image.Image] | np.ndarray | Tensor


class PipelineOutput:
    """Field access by name, by key (``out["images"]``, ``out.get(...)``) or by position (``out[0]``)."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: int | str) -> Any:
        return self.to_tuple()[key] if isinstance(key, int) else getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)


@dataclasses.dataclass
class StableCascadePriorPipelineOutput(PipelineOutput):
    image_embeddings: Tensor | np.ndarray  # (B·n, 16, h, w) Stage C latents
    prompt_embeds: Tensor | np.ndarray
    prompt_embeds_pooled: Tensor | np.ndarray
    negative_prompt_embeds: Tensor | np.ndarray | None
    negative_prompt_embeds_pooled: Tensor | np.ndarray | None

    def decoder_arguments(self) -> dict[str, Any]:
        """Every field as the decoder pipeline's keyword argument of the same name (how a cascade
        hands Stage C's latents and the text embeddings on)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}


@dataclasses.dataclass
class ImagePipelineOutput(PipelineOutput):
    images: Images


def check_output_type(output_type: str, allowed: tuple[str, ...]) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}; got {output_type!r}")


def to_numpy(tensor: Tensor) -> np.ndarray:
    return tensor.detach().cpu().float().numpy()  # float(): numpy has no bfloat16


def postprocess(images: Tensor, output_type: str) -> Images:
    """Images (B, 3, H, W) in [0, 1] as a tensor ("pt"), NHWC float array ("np") or PIL images.

    PIL: diffusers' ``(x · 255).round()`` to bytes in float32 (round half to even, as numpy), done
    where the images are, so a GPU hands over bytes, not floats.
    """
    if output_type == "pt":
        return images
    if output_type == "np":
        return to_numpy(images.permute(0, 2, 3, 1))  # (B, H, W, 3)
    pixels = (images.detach().float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return [PIL.Image.fromarray(image) for image in pixels.contiguous().cpu().numpy()]


def as_numpy_if(value: Tensor | None, convert: bool) -> Tensor | np.ndarray | None:
    return to_numpy(value) if convert and value is not None else value
