"""Opening user image files with errors that name the file, and a guard against decompression bombs.

A small compressed file can declare a huge image (a "decompression bomb") that would exhaust memory
when decoded; any image over :data:`MAX_IMAGE_PIXELS` is refused from its header, before decoding.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import BinaryIO

import PIL.Image

#: The most pixels an image file may have: PIL's own default warning threshold (about 89.5 megapixels,
#: e.g. 9459×9459); larger images are refused rather than decoded.
MAX_IMAGE_PIXELS = 89_478_485


def open_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, load: bool = True) -> PIL.Image.Image:
    """The image in file ``path`` (decoded unless ``load=False``, which reads only the header).

    Raises ``FileNotFoundError`` when there is no such file, and ``ValueError`` naming the file when it
    is not a readable image, is truncated, or has more than ``max_pixels`` pixels.
    """
    path = Path(path)
    if not path.is_file():
        what = "is a folder, not an image file" if path.is_dir() else "does not exist"
        raise FileNotFoundError(f"image {path} {what}")
    return _open(path, str(path), max_pixels, load)


def open_image_bytes(
    data: bytes, name: str, *, max_pixels: int = MAX_IMAGE_PIXELS, load: bool = True
) -> PIL.Image.Image:
    """:func:`open_image` for an image held in memory (e.g. a member of a tar shard); ``name`` names it."""
    return _open(io.BytesIO(data), name, max_pixels, load)


def _open(source: Path | BinaryIO, name: str, max_pixels: int, load: bool) -> PIL.Image.Image:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)  # our own limit decides below
        try:
            image = PIL.Image.open(source)
        except PIL.Image.DecompressionBombError as error:
            raise ValueError(_too_large(name, max_pixels, str(error))) from None
        except PIL.UnidentifiedImageError:
            raise ValueError(f"{name} is not an image file that PIL can read (PNG, JPEG, WebP, …)") from None
    pixels = image.width * image.height
    if pixels > max_pixels:
        image.close()
        raise ValueError(
            _too_large(name, max_pixels, f"it is {image.width}×{image.height} = {pixels:,} pixels")
        )
    if load:
        try:
            image.load()
        except (OSError, ValueError, SyntaxError) as error:  # truncated or corrupt data, oversized chunks
            image.close()
            raise ValueError(
                f"{name} could not be decoded ({error}); it may be truncated or corrupt"
            ) from None
    return image


def _too_large(name: str, max_pixels: int, detail: str) -> str:
    return (
        f"{name} is too large to open safely ({detail}; the limit is {max_pixels:,} pixels, a guard "
        "against decompression bombs); downscale the image first"
    )
