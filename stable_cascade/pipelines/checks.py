"""Argument checks the pipelines make before any work: step counts, tensors given by the caller and
their agreement with the models, each failure one line saying what was expected.

The bounds are those of the CLI and the server (:mod:`stable_cascade.limits`): at most 1000 steps a
stage, images of at most 8192 pixels a side and 4096² in all. Tensors the caller passes (latents,
embeddings, images) must be real floating point (any precision: they are cast to the model's dtype,
as diffusers casts embeddings) and have no empty dimension.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from stable_cascade.conditioning.text import PromptConditioning
from stable_cascade.limits import MAX_STEPS
from stable_cascade.pipelines.sizes import check_image_size
from stable_cascade.specs import UNetConfig


def check_steps(name: str, value: object) -> None:
    """A step count: None (the preset's) or a whole number from 1 to 1000."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a whole number of steps, got {value!r}")
    if not 1 <= value <= MAX_STEPS:
        raise ValueError(f"{name} must be between 1 and {MAX_STEPS}, got {value}")


def check_timesteps(timesteps: Sequence[float] | Tensor | None) -> None:
    """Custom timesteps: at most 1001 values (1000 steps); their values are checked by the schedule."""
    if timesteps is not None and len(timesteps) > MAX_STEPS + 1:
        raise ValueError(
            f"timesteps has {len(timesteps)} values; at most {MAX_STEPS + 1} ({MAX_STEPS} steps)"
        )


def check_tensor(name: str, value: object, shape: str = "") -> Tensor:
    """``value`` as a real floating-point tensor without empty dimensions; ``shape`` describes the
    expected shape in the messages (``"(B, 16, h, w)"``)."""
    expected = f" of shape {shape}" if shape else ""
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{expected}, got {type(value).__name__}")
    if not value.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32, float16, bfloat16 or float64), got "
            f"{value.dtype}; convert it with .float()"
        )
    if value.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(value.shape)}); expected a tensor{expected}")
    return value


def check_optional_tensor(name: str, value: object, shape: str = "") -> None:
    if value is not None:
        check_tensor(name, value, shape)


def check_text_widths(text: PromptConditioning, unet: UNetConfig, stage: str) -> None:
    """The text embeddings (given or encoded) fit the UNet's text mappers."""
    expected = {"pooled": unet.clip_text_pooled_in_channels, "hidden": unet.clip_text_in_channels}
    for embeddings in (text.cond, text.uncond):
        if embeddings is None:
            continue
        for part, width in expected.items():
            got = getattr(embeddings, part).shape[-1]
            if width is not None and got != width:
                name = "prompt_embeds_pooled" if part == "pooled" else "prompt_embeds"
                raise ValueError(
                    f"the text embeddings ({name} or the text encoder's output) are {got} wide but the "
                    f"{stage} takes {width}; use the text encoder this {stage} was trained with"
                )


def image_embeddings(value: Tensor | list[Tensor], channels: int | None) -> Tensor:
    """The decoder's Stage C latents as one (B, C, h, w) tensor, from a tensor or a list of them."""
    shape = f"(B, {channels or 'C'}, h, w)"
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"image_embeddings is an empty list; pass Stage C latents {shape}")
        tensors = [check_tensor(f"image_embeddings[{i}]", t, shape) for i, t in enumerate(value)]
        sizes = {tuple(t.shape[1:]) for t in tensors}
        if len(sizes) > 1 or any(t.ndim != 4 for t in tensors):
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise ValueError(f"image_embeddings in a list must all be {shape} of one size; got {shapes}")
        value = torch.cat(tensors)
    latents = check_tensor("image_embeddings", value, shape)
    if latents.ndim != 4 or (channels is not None and latents.shape[1] != channels):
        raise ValueError(
            f"image_embeddings must be Stage C latents {shape}; got shape {tuple(latents.shape)}"
        )
    return latents


def check_combined_call(height: int, width: int, prior_steps: int | None, decoder_steps: int | None) -> None:
    """The combined pipeline's size and step counts, before either stage runs (0 steps is an error,
    not the preset's count)."""
    check_image_size(height, width)
    check_steps("prior_num_inference_steps", prior_steps)
    check_steps("num_inference_steps", decoder_steps)


def per_image(embeds: Tensor, batch_size: int, per_prompt: int, name: str) -> Tensor:
    """A (1 | B | B·n, ...) tensor with one row per generated image (B prompts, n images each)."""
    rows = batch_size * per_prompt
    if embeds.shape[0] == 1:
        return embeds.repeat(rows, *(1,) * (embeds.ndim - 1))
    if embeds.shape[0] == batch_size:
        return embeds.repeat_interleave(per_prompt, dim=0)
    if embeds.shape[0] == rows:
        return embeds
    raise ValueError(
        f"{name} has batch {embeds.shape[0]}; expected 1, the number of prompts ({batch_size}) "
        f"or prompts × num_images_per_prompt ({rows})"
    )
