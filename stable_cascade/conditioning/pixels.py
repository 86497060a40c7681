"""Pixel inputs: user images as one (B, 3, H, W) batch in [0, 1], and the EfficientNet input size.

Each image is resized so that it covers the target size (bilinear with antialiasing, shorter side
first as torchvision's ``Resize``) and then center-cropped to it (``CenterCrop``), so the aspect
ratio is kept and no padding appears: the preprocessing of the original Stable Cascade notebooks.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeAlias

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.nn import functional as F

ImageInput: TypeAlias = PIL.Image.Image | Tensor | Sequence[PIL.Image.Image | Tensor]

#: The EfficientNet encoder sees images at this fraction of the output size (original Stage B/C code).
EFFNET_SCALE = 3 / 4
EFFNET_MULTIPLE = 32


def effnet_input_size(height: int, width: int) -> tuple[int, int]:
    """The EfficientNet input size for an output of ``height``×``width``: 3/4 of each side rounded
    down to a multiple of 32 (at least 32), e.g. 1024×1024 → 768×768, 720×1024 → 512×768.

    Rounding down matches the original's ``int(side * factor // 32 * 32)`` (``stage_b.py``).
    """
    _check_size(height, width)

    def side(pixels: int) -> int:
        return max(EFFNET_MULTIPLE, int(pixels * EFFNET_SCALE // EFFNET_MULTIPLE) * EFFNET_MULTIPLE)

    return side(height), side(width)


def prepare_images(images: ImageInput, height: int, width: int) -> Tensor:
    """PIL image(s) or float tensor(s) in [0, 1] → float32 (B, 3, height, width) in [0, 1].

    Accepts a PIL image, a (3, H, W) or (B, 3, H, W) tensor, or a list of those (concatenated in
    order). PIL images are converted to RGB; the batch is on the first tensor's device (else CPU).
    """
    _check_size(height, width)
    items = [images] if isinstance(images, (PIL.Image.Image, Tensor)) else images
    if not isinstance(items, Sequence) or isinstance(items, (str, bytes)):
        raise TypeError(
            f"images must be a PIL image, a tensor or a list of them, got {type(images).__name__}; "
            "wrap several images in a list"
        )
    if not items:
        raise ValueError("images is an empty list; pass at least one image")
    batches = [_as_batch(index, item) for index, item in enumerate(items)]
    device = next(
        (b.device for b, item in zip(batches, items, strict=True) if isinstance(item, Tensor)), None
    )
    resized = [_cover_and_crop(batch.to(device or "cpu"), height, width) for batch in batches]
    return torch.cat(resized)  # (B, 3, height, width)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int number of pixels, got {value!r}")
        if value < 1:
            raise ValueError(f"{name} must be a positive number of pixels, got {value}")


def _as_batch(index: int, item: object) -> Tensor:
    """One list item as a float32 (N, 3, H, W) tensor in [0, 1]."""
    if isinstance(item, PIL.Image.Image):
        array = np.asarray(item.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    if not isinstance(item, Tensor):
        raise TypeError(
            f"images[{index}] must be a PIL.Image.Image or a torch.Tensor, got {type(item).__name__}; "
            "convert it, e.g. with PIL.Image.open(path)"
        )
    shape = tuple(item.shape)
    if not (len(shape) in (3, 4) and shape[-3] == 3):
        raise ValueError(f"tensor images[{index}] must have shape (3, H, W) or (B, 3, H, W), got {shape}")
    if not item.is_floating_point():
        raise TypeError(
            f"tensor images[{index}] must be a float tensor in [0, 1], got dtype {item.dtype}; "
            "use image.float() / 255 for 8-bit pixels"
        )
    if item.numel() == 0:
        raise ValueError(f"tensor images[{index}] is empty (shape {shape})")
    low, high = float(item.min()), float(item.max())
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"tensor images[{index}] must hold values in [0, 1], got [{low:.4g}, {high:.4g}]; rescale it, "
            "e.g. (image + 1) / 2 for [-1, 1] pixels"
        )
    batch = item.detach().float()
    return batch if batch.ndim == 4 else batch[None]


def _cover_and_crop(batch: Tensor, height: int, width: int) -> Tensor:
    """Resize (N, 3, H, W) to cover height×width, keeping the aspect ratio, then center-crop."""
    h, w = batch.shape[-2:]
    scale = max(height / h, width / w)
    # ceil guards against a rounded size one pixel short of the target.
    size = (max(height, math.ceil(h * scale - 1e-6)), max(width, math.ceil(w * scale - 1e-6)))
    if size != (h, w):
        batch = F.interpolate(batch, size=size, mode="bilinear", antialias=True, align_corners=False)
        batch = batch.clamp(0.0, 1.0)  # the antialiased kernel can overshoot by a rounding error
    # Offsets rounded as torchvision's CenterCrop does.
    top, left = round((size[0] - height) / 2), round((size[1] - width) / 2)
    return batch[..., top : top + height, left : left + width]
