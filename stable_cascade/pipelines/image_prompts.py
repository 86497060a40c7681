"""Stage C's image conditioning for one prior call: image prompts and negative image prompts as the
prior's ``clip_img`` of both guidance branches, and as the input of the attached IP-Adapters.

diffusers' prior pipeline encodes ``images`` (or takes ``image_embeds``) for the conditional branch and
gives the unconditional one zeros of the same shape; without images both get one zero embedding.
Negative image prompts (``negative_images`` / ``negative_image_embeds``) replace those zeros; when the
two branches hold different numbers of images, the shorter is padded with zero embeddings (each image
is ``clip_seq`` tokens, and a zero embedding is what diffusers gives a branch without an image).

With IP-Adapters attached (:mod:`stable_cascade.nn.ip_adapter`) the image prompts are their input
instead (the embeddings, or the image encoder's patch tokens for adapters with a resampler), and the
prior's own CLIP image tokens get the zero embedding, as while the adapters trained: the frozen prior
is prompted by the text alone and the adapters carry the images. At scale 0 an adapter therefore gives
the prior's text-only result exactly. A prior without CLIP image conditioning (``clip_image_in_channels``
None) takes image prompts through IP-Adapters only.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from stable_cascade.conditioning.image import ImagePrompt, encode_image_prompts, image_prompts
from stable_cascade.pipelines.checks import check_tensor, per_image


@dataclasses.dataclass(frozen=True)
class ImageConditioning:
    """The prior's image inputs of both branches, one row per generated image (None: not used)."""

    clip_img: Tensor | None
    negative_clip_img: Tensor | None
    ip_image: Tensor | None
    negative_ip_image: Tensor | None


@dataclasses.dataclass(frozen=True)
class ImageArguments:
    """What a prior call was given: images (or embeddings) for each branch."""

    images: Any = None
    image_embeds: Tensor | None = None
    negative_images: Any = None
    negative_image_embeds: Tensor | None = None

    def check(self) -> None:
        for images, embeds, name in (
            (self.images, self.image_embeds, ""),
            (self.negative_images, self.negative_image_embeds, "negative_"),
        ):
            if images is not None and embeds is not None:
                raise ValueError(f"pass either {name}images or {name}image_embeds, not both")
            if images is not None:
                image_prompts(images, f"{name}images")

    @property
    def given(self) -> bool:
        given = (self.images, self.image_embeds, self.negative_images, self.negative_image_embeds)
        return any(value is not None for value in given)


def image_conditioning(
    pipe: Any, given: ImageArguments, batch_size: int, per_prompt: int
) -> ImageConditioning:
    """The image inputs of a call of the prior pipeline ``pipe`` (see the module's docstring)."""
    given.check()
    prior = pipe.prior
    width = prior.config.clip_image_in_channels
    adapters = [adapter for adapter, _ in prior.ip_adapters.values()]
    if not adapters:
        if width is None and given.given:
            raise ValueError(
                "this prior takes no CLIP image embeddings (clip_image_in_channels is None); attach an "
                "IP-Adapter to prompt it with images"
            )
        if width is None:
            return ImageConditioning(None, None, None, None)
        rows = batch_size * per_prompt
        zeros = torch.zeros(rows, 1, width, device=pipe.execution_device, dtype=prior.dtype)
        cond, uncond = _embeddings(pipe, given, width, batch_size, per_prompt) or (zeros, zeros)
        return ImageConditioning(cond, uncond, None, None)
    config = adapters[0].config  # the adapters take the images over (see the module's docstring)
    if config.input == "patches":
        found = _patches(pipe, given, batch_size, per_prompt)
    else:
        found = _embeddings(pipe, given, config.image_dim, batch_size, per_prompt)
    ip_image, negative_ip_image = found or (None, None)
    return ImageConditioning(None, None, ip_image, negative_ip_image)


def _embeddings(
    pipe: Any, given: ImageArguments, width: int, batch_size: int, per_prompt: int
) -> tuple[Tensor, Tensor] | None:
    """Both branches' image embeddings (rows, N, C), zero-padded alike; None without any image."""
    found = [
        _branch(pipe, images, embeds, width, name, batch_size, per_prompt)
        for images, embeds, name in (
            (given.images, given.image_embeds, "image_embeds"),
            (given.negative_images, given.negative_image_embeds, "negative_image_embeds"),
        )
    ]
    return _padded(found[0], found[1], width, pipe.execution_device, pipe.prior.dtype)


def _branch(
    pipe: Any, images: Any, embeds: Tensor | None, width: int, name: str, batch_size: int, per_prompt: int
) -> Tensor | None:
    """One branch's image embeddings (rows, N, C) from images or given embeddings; None without any."""
    if images is not None:
        encoded = _encode(pipe, image_prompts(images, name.replace("image_embeds", "images")), patches=False)
        if encoded is None:  # every image at strength 0
            return None
        embeds = encoded
    if embeds is None:
        return None
    check_tensor(name, embeds, f"(B, N, {width})")
    while embeds.ndim < 3:
        embeds = embeds.unsqueeze(0)  # (C,) / (N, C) → (1, N, C)
    if embeds.shape[-1] != width:
        raise ValueError(f"{name} must have {width} channels (B, N, {width}); got {tuple(embeds.shape)}")
    return per_image(embeds, batch_size, per_prompt, name).to(pipe.execution_device)


def _encode(pipe: Any, prompts: list[ImagePrompt], patches: bool) -> Tensor | None:
    if pipe.image_encoder is None or pipe.feature_extractor is None:
        raise ValueError(
            "image prompts need the CLIP image encoder and feature extractor; load the pipeline with "
            "image_encoder= and feature_extractor= (e.g. from stabilityai/stable-cascade-prior)"
        )
    encoder = pipe.activate("image_encoder")
    return encode_image_prompts(
        pipe.feature_extractor, encoder, prompts, pipe.execution_device, pipe.prior.dtype, patches
    )


def _padded(
    cond: Tensor | None, uncond: Tensor | None, width: int, device: torch.device, dtype: torch.dtype
) -> tuple[Tensor, Tensor] | None:
    """Both branches with as many images, zeros where a branch has fewer; None without any."""
    present = [t for t in (cond, uncond) if t is not None]
    if not present:
        return None
    rows, count = present[0].shape[0], max(t.shape[1] for t in present)
    shape = (rows, count, *present[0].shape[2:-1], width)
    zeros = torch.zeros(shape, device=device, dtype=dtype)

    def filled(tokens: Tensor | None) -> Tensor:
        if tokens is None:
            return zeros
        if tokens.shape[1] == count:
            return tokens
        return torch.cat([tokens, zeros[:, tokens.shape[1] :].to(tokens.dtype)], dim=1)

    return filled(cond), filled(uncond)


def _patches(
    pipe: Any, given: ImageArguments, batch_size: int, per_prompt: int
) -> tuple[Tensor, Tensor] | None:
    """Both branches' patch tokens (rows, N, P, C) for resampler IP-Adapters, zero-padded alike."""
    if given.image_embeds is not None or given.negative_image_embeds is not None:
        raise ValueError(
            "IP-Adapters with a resampler read images' patch tokens: pass images, not image_embeds"
        )
    found = []
    for images, name in ((given.images, "images"), (given.negative_images, "negative_images")):
        encoded = _encode(pipe, image_prompts(images, name), patches=True) if images is not None else None
        found.append(None if encoded is None else per_image(encoded, batch_size, per_prompt, name))
    width = next((t.shape[-1] for t in found if t is not None), 0)
    return _padded(found[0], found[1], width, pipe.execution_device, pipe.prior.dtype)
