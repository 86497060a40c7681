"""Image and latent sizes of the cascade.

Stage C's latent is ``ceil(size / resolution_multiple)``. Stage B's latent is the Stage A latent of
the requested image, ``size / 4``, so every multiple of 8 decodes to exactly that size; without a
requested size it follows diffusers (``int(c * latent_dim_scale)``), rounded up to an even size
where diffusers would produce an odd one and crash.
"""

from __future__ import annotations

import math

from stable_cascade.limits import MAX_PIXELS, MAX_SIDE, SIZE_MULTIPLE


def check_image_size(height: int, width: int, minimum: int = SIZE_MULTIPLE) -> None:
    """A requested image size: multiples of 8 from ``minimum`` to 8192 pixels a side, 4096² in all."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int number of pixels, got {value!r}")
        if value % SIZE_MULTIPLE or not minimum <= value <= MAX_SIDE:
            nearest = min(MAX_SIDE, max(minimum, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE))
            raise ValueError(
                f"{name} must be a multiple of {SIZE_MULTIPLE} from {minimum} to {MAX_SIDE} pixels, got "
                f"{value}; try {nearest}"
            )
    check_pixel_count(height, width)


def check_pixel_count(height: int, width: int, what: str = "the image") -> None:
    """At most :data:`~stable_cascade.limits.MAX_PIXELS` (4096²) pixels and 8192 a side."""
    if height * width > MAX_PIXELS or max(height, width) > MAX_SIDE:
        raise ValueError(
            f"{what} would be {width}x{height} pixels, more than the limit of {MAX_PIXELS:,} pixels "
            f"(4096x4096) or {MAX_SIDE} a side; ask for a smaller size"
        )


def prior_latent_size(height: int, width: int, resolution_multiple: float) -> tuple[int, int]:
    return math.ceil(height / resolution_multiple), math.ceil(width / resolution_multiple)


def decoder_latent_size(
    prior_size: tuple[int, int],
    latent_dim_scale: float,
    image_size: tuple[int, int] | None,
    downscale: int,
    multiple: int = 2,
) -> tuple[int, int]:
    """Stage B latent (h, w): ``image_size / downscale`` when the image size is known, else
    diffusers' ``int(c * latent_dim_scale)`` rounded up to a multiple of the UNet's patch size."""
    if image_size is not None:
        return image_size[0] // downscale, image_size[1] // downscale
    h, w = (int(side * latent_dim_scale) for side in prior_size)
    return -(-h // multiple) * multiple, -(-w // multiple) * multiple
