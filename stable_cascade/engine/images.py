"""Opening input images safely: readable, RGB, and not a decompression bomb."""

from __future__ import annotations

import warnings
from pathlib import Path

import PIL.Image

#: The most pixels an input image may have (PIL's own warning threshold is ~89 MP).
MAX_INPUT_PIXELS = 64 * 1024 * 1024


def open_image(path: str | Path) -> PIL.Image.Image:
    """The RGB pixels of the image file ``path``; a ``ValueError`` for what is not a sane image."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(path) as file:
                width, height = file.size
                if width * height > MAX_INPUT_PIXELS:
                    raise ValueError(
                        f"{path} is {width}x{height} pixels, more than the {MAX_INPUT_PIXELS:,} an input "
                        "image may have; scale it down first"
                    )
                return file.convert("RGB")
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as error:
        raise ValueError(f"{path} is too large to open safely ({error}); scale it down first") from None
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error
