"""Opening a job's input images: readable, RGB, and within the input size limit."""

from __future__ import annotations

from pathlib import Path

import PIL.Image

from stable_cascade.conditioning.image_files import open_image as open_image_file

#: The most pixels an input image of a job may have (below the general file limit: the pipelines
#: resize it to the output size anyway).
MAX_INPUT_PIXELS = 64 * 1024 * 1024


def open_image(path: str | Path) -> PIL.Image.Image:
    """The RGB pixels of the image file ``path``; a ``ValueError`` naming it for what is not a sane
    image (unreadable, truncated, or over :data:`MAX_INPUT_PIXELS`)."""
    with open_image_file(path, max_pixels=MAX_INPUT_PIXELS) as image:
        return image.convert("RGB")
