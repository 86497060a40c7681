"""ControlNet inputs, as the original Stable Cascade filters make them (``modules/controlnet.py``).

- ``canny``: the image resized to 224×224 (bilinear), OpenCV's Canny edges with thresholds 100/200
  on its 8-bit RGB pixels, resized back (bilinear): (B, 1, H, W) in [0, 1] (``CannyFilter``).
- ``inpainting``: the image with the region to generate set to 1.0 (white) and the mask appended:
  (B, 4, H, W); the mask is True (1.0) where new content is generated (``InpaintFilter``).
  Outpainting is inpainting with an image placed on a larger canvas (:func:`outpainting_canvas`).
- ``super_resolution``: the EfficientNet latent of the low-resolution image, upsampled ×2
  (nearest): (B, 16, 2·⌈H/32⌉, 2·⌈W/32⌉) (``SREffnetFilter`` and the original SR notebook).

OpenCV (``opencv-python-headless``) is an optional dependency: ``pip install 'stable-cascade[controlnet]'``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.nn import functional as F

from stable_cascade.conditioning.pixels import ImageInput, prepare_images
from stable_cascade.specs.controlnet import ControlType

CANNY_SIZE = 224
CANNY_THRESHOLDS = (100, 200)
#: How much the super-resolution ControlNet enlarges its input (the original notebook: 1024² → 2048²).
SUPER_RESOLUTION_FACTOR = 2
MaskInput = PIL.Image.Image | Tensor
Encoder = Callable[[Tensor], Tensor]


def _opencv() -> Any:
    try:
        return importlib.import_module("cv2")
    except ImportError:
        raise ImportError(
            "canny control images need OpenCV: pip install 'stable-cascade[controlnet]' "
            "(or opencv-python-headless)"
        ) from None


def canny_edges(images: Tensor, resize: int | None = CANNY_SIZE) -> Tensor:
    """(B, 3, H, W) images in [0, 1] → (B, 1, H, W) Canny edge maps in [0, 1], as ``CannyFilter``."""
    cv2 = _opencv()
    size = images.shape[-2:]
    x = images.detach().float().cpu()
    if resize is not None:
        x = F.interpolate(x, size=(resize, resize), mode="bilinear")
    # 8-bit pixels by truncation (the original's ``mul(255)...astype(np.uint8)``), H×W×3 per image.
    pixels = x.mul(255).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    low, high = CANNY_THRESHOLDS
    edges = torch.stack([torch.from_numpy(cv2.Canny(np.ascontiguousarray(p), low, high)) for p in pixels])
    edges = edges[:, None].float() / 255  # (B, 1, h, w)
    if resize is not None:
        edges = F.interpolate(edges, size=size, mode="bilinear")
    return edges.to(images.device)


def prepare_mask(mask: MaskInput, height: int, width: int) -> Tensor:
    """A PIL image or (H, W) / (1, H, W) / (B, 1, H, W) tensor → bool (B, 1, height, width).

    White / True / values ≥ 0.5 mark the region to generate. The mask is fitted to the size as the
    images are (cover, then center-crop).
    """
    if isinstance(mask, PIL.Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / 255
        tensor = torch.from_numpy(array.copy())[None, None]
    elif isinstance(mask, Tensor):
        if mask.ndim not in (2, 3, 4) or (mask.ndim > 2 and mask.shape[-3] != 1):
            raise ValueError(
                f"mask_image must have shape (H, W), (1, H, W) or (B, 1, H, W), got {tuple(mask.shape)}"
            )
        tensor = mask.detach().float().reshape(-1, 1, *mask.shape[-2:])
    else:
        raise TypeError(f"mask_image must be a PIL image or a tensor, got {type(mask).__name__}")
    fitted = prepare_images(tensor.clamp(0, 1).expand(-1, 3, -1, -1), height, width)[:, :1]
    return fitted >= 0.5


def inpainting_control(images: Tensor, mask: Tensor) -> Tensor:
    """(B, 3, H, W) images and a bool (B or 1, 1, H, W) mask (True = generate) → (B, 4, H, W)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"the inpainting mask must be a bool tensor (True = generate), got {mask.dtype}")
    if mask.shape[-2:] != images.shape[-2:]:
        sizes = f"{tuple(mask.shape[-2:])} and {tuple(images.shape[-2:])}"
        raise ValueError(f"the mask and the images must have the same size, got {sizes}")
    mask = mask.to(images.device).expand(images.shape[0], 1, *images.shape[-2:])
    masked = torch.where(mask, torch.ones_like(images), images)
    return torch.cat([masked, mask.to(images.dtype)], dim=1)


def outpainting_canvas(
    image: Tensor, height: int, width: int, top: int | None = None, left: int | None = None
) -> tuple[Tensor, Tensor]:
    """Place (B, 3, h, w) ``image`` on a white ``height``×``width`` canvas (centered by default).

    Returns the canvas and its bool (B, 1, height, width) mask, True outside the image: the
    inverted mask of the placed image, for :func:`inpainting_control`.
    """
    h, w = image.shape[-2:]
    top = (height - h) // 2 if top is None else top
    left = (width - w) // 2 if left is None else left
    if top < 0 or left < 0 or top + h > height or left + w > width:
        raise ValueError(
            f"a {h}×{w} image at (top={top}, left={left}) does not fit a {height}×{width} canvas; "
            "make the canvas larger or the image smaller"
        )
    canvas = image.new_ones(image.shape[0], 3, height, width)
    canvas[..., top : top + h, left : left + w] = image
    mask = torch.ones(image.shape[0], 1, height, width, dtype=torch.bool, device=image.device)
    mask[..., top : top + h, left : left + w] = False
    return canvas, mask


def super_resolution_control(images: Tensor, encode: Encoder) -> Tensor:
    """(B, 3, H, W) low-resolution images in [0, 1] → their EfficientNet latents upsampled ×2
    (nearest); ``encode`` is the encoder's ``encode`` (ImageNet normalisation included)."""
    latents = encode(images)  # (B, 16, H/32, W/32)
    return F.interpolate(latents.float(), scale_factor=SUPER_RESOLUTION_FACTOR, mode="nearest")


def control_input(
    control_type: ControlType,
    image: ImageInput,
    height: int,
    width: int,
    mask: MaskInput | None = None,
    encode: Encoder | None = None,
) -> Tensor:
    """The ControlNet input for ``image`` fitted to ``height``×``width`` (the input size for
    ``super_resolution``: the output is twice as large)."""
    images = prepare_images(image, height, width)  # (B, 3, H, W) in [0, 1]
    if control_type == "canny":
        return canny_edges(images)
    if control_type == "inpainting":
        if mask is None:
            raise ValueError("inpainting needs mask_image (white = region to generate)")
        return inpainting_control(images, prepare_mask(mask, height, width).to(images.device))
    if encode is None:
        raise ValueError("super_resolution needs the EfficientNet encoder (the pipeline's effnet component)")
    return super_resolution_control(images, encode)
