"""CLIP image conditioning of Stage C (the prior).

Matches diffusers' ``StableCascadePriorPipeline.encode_image`` (diffusers 0.42.1): each image is
preprocessed and encoded on its own, and the N image embeddings become N tokens of one sequence
``(1, N, C)``, so several images are mixed into one condition. Deliberate differences:

* a single image (not in a list) is accepted; diffusers iterates over it (a tensor's channels);
* a tensor image is taken as already in [0, 1] (``do_rescale=False``); diffusers lets the feature
  extractor divide it by 255 again, which turns every tensor image into a near-black one;
* pixels are cast to the image encoder's dtype and the embedding to ``dtype``, so the encoder may
  run in another precision than the prior (diffusers casts the pixels to ``dtype``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeAlias

import PIL.Image
import torch
from torch import Tensor

if TYPE_CHECKING:
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

ImageInput: TypeAlias = PIL.Image.Image | Tensor


def check_images(images: object) -> list[ImageInput]:
    """One image or a list of them, as a list; PIL images, or float tensors (3,H,W)/(1,3,H,W) in [0, 1]."""
    items = [images] if isinstance(images, (PIL.Image.Image, Tensor)) else images
    if not isinstance(items, (list, tuple)):
        raise TypeError(
            f"`images` must be a PIL image, a tensor or a list of them, got {type(images).__name__}. "
            "Wrap several images in a list."
        )
    if not items:
        raise ValueError(
            "`images` is an empty list. Pass at least one image, or None for no image conditioning."
        )
    for index, item in enumerate(items):
        if isinstance(item, Tensor):
            _check_tensor(index, item)
        elif not isinstance(item, PIL.Image.Image):
            raise TypeError(
                f"`images[{index}]` must be a PIL.Image.Image or a torch.Tensor, got {type(item).__name__}. "
                "Convert it, e.g. with `PIL.Image.open(path)`."
            )
    return list(items)


def _check_tensor(index: int, image: Tensor) -> None:
    shape = tuple(image.shape)
    if not (len(shape) == 3 and shape[0] == 3) and not (len(shape) == 4 and shape[:2] == (1, 3)):
        raise ValueError(
            f"Tensor `images[{index}]` must have shape (3, H, W) or (1, 3, H, W), got {shape}. "
            "Pass each image of a batch as its own list item, e.g. `list(batch)`."
        )
    if not image.is_floating_point():
        raise TypeError(
            f"Tensor `images[{index}]` must be a float tensor in [0, 1], got dtype {image.dtype}. "
            "Use `image.float() / 255` for 8-bit pixels."
        )
    if image.numel() == 0:
        raise ValueError(
            f"Tensor `images[{index}]` is empty (shape {shape}); pass an image of at least 1×1 pixels."
        )
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"Tensor `images[{index}]` must hold values in [0, 1], got [{low:.4g}, {high:.4g}]. "
            "Rescale it, e.g. `(image + 1) / 2` for [-1, 1] pixels or `image / 255` for [0, 255]."
        )


def encode_images(
    feature_extractor: CLIPImageProcessor,
    image_encoder: CLIPVisionModelWithProjection,
    images: Sequence[ImageInput],
    device: torch.device | str,
    dtype: torch.dtype,
) -> Tensor:
    """CLIP image embeddings of ``images`` as one sequence: (1, N, C_img), in ``dtype`` on ``device``."""
    items = check_images(list(images))
    embeddings = [_encode_one(feature_extractor, image_encoder, image, device) for image in items]
    return torch.stack(embeddings, dim=1).to(dtype=dtype)  # (1, N, C_img)


def _encode_one(
    feature_extractor: CLIPImageProcessor,
    image_encoder: CLIPVisionModelWithProjection,
    image: ImageInput,
    device: torch.device | str,
) -> Tensor:
    """(1, C_img) embedding of one image."""
    options = {"do_rescale": False} if isinstance(image, Tensor) else {}
    # Preprocessing runs on the CPU (the PIL backend of the feature extractor needs host memory).
    source = image.detach().cpu() if isinstance(image, Tensor) else image
    pixels = feature_extractor(source, return_tensors="pt", **options).pixel_values  # (1, 3, h, w)
    with torch.no_grad():
        output = image_encoder(pixels.to(device=device, dtype=image_encoder.dtype))
    return output.image_embeds
