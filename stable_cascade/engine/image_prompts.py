"""A job's image prompts: each an image file (absolute path), a strength and the sha256 of its pixels.

A strength multiplies the image's CLIP embedding (0 leaves the image out, as if it were not given);
image prompts are mixed with the text prompt, and negative image prompts steer the unconditional
branch of guidance (see :mod:`stable_cascade.pipelines.image_prompts`). Records name the files with
their pixels' sha256 (as :func:`~stable_cascade.engine.hashing.image_sha256` computes it), so a record
says exactly which images prompted its image.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import PIL.Image

from stable_cascade.engine.hashing import image_sha256
from stable_cascade.engine.images import open_image
from stable_cascade.fields import checks


@dataclasses.dataclass(frozen=True)
class ImagePromptRef:
    """One image prompt of a job (see the module's docstring)."""

    path: str
    strength: float = 1.0
    sha256: str | None = None

    def validate(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"an image prompt's path must be a file name, got {self.path!r}")
        checks.check_float(
            f"the strength of image prompt {self.path}", self.strength, 0.0, checks.MAX_IMAGE_STRENGTH
        )
        if not isinstance(self.sha256, str):
            raise ValueError(
                f"the image prompt {self.path} needs the sha256 of its pixels (see image_sha256)"
            )


ImagePromptGiven = ImagePromptRef | tuple[str | Path, float]


def resolve_image_prompts(
    prompts: Sequence[ImagePromptGiven], what: str = "image prompt"
) -> tuple[ImagePromptRef, ...]:
    """The image prompts with absolute paths and their pixels' sha256; an image that is missing, not
    readable, too large, or not the one a given sha256 names raises ``ValueError``."""
    if isinstance(prompts, (str, Path)) or not isinstance(prompts, Sequence):
        raise ValueError(f"{what}s must be a list of image files with strengths, got {prompts!r}")
    return tuple(_resolved(prompt, what) for prompt in prompts)


def _resolved(prompt: ImagePromptGiven, what: str) -> ImagePromptRef:
    if isinstance(prompt, ImagePromptRef):
        ref = prompt
    elif isinstance(prompt, tuple) and len(prompt) == 2:
        strength = checks.check_float(f"{what} strength", prompt[1], 0.0, checks.MAX_IMAGE_STRENGTH)
        ref = ImagePromptRef(str(prompt[0]), strength)
    else:
        raise ValueError(f"each {what} is an image file with a strength (FILE[:STRENGTH]), got {prompt!r}")
    digest = image_sha256(_open(ref.path, what))
    if ref.sha256 is not None and ref.sha256 != digest:
        raise ValueError(_differs(ref, what))
    return dataclasses.replace(ref, path=str(Path(ref.path).resolve()), sha256=digest)


def open_image_prompts(
    prompts: Sequence[ImagePromptRef], what: str = "image prompt"
) -> list[PIL.Image.Image]:
    """The images a job's prompts name, checked against their recorded sha256."""
    images = []
    for ref in prompts:
        image = _open(ref.path, what)
        if image_sha256(image) != ref.sha256:
            raise ValueError(_differs(ref, what))
        images.append(image)
    return images


def _open(path: str, what: str) -> PIL.Image.Image:
    try:
        return open_image(path)
    except FileNotFoundError:
        raise ValueError(f"the {what} {path} does not exist; pass an existing image file") from None


def _differs(ref: ImagePromptRef, what: str) -> str:
    return (
        f"the {what} {ref.path} is not the one the job names (sha256 {str(ref.sha256)[:12]}…); pass the "
        "image the job was made with, or create the job again"
    )
