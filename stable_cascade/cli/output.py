"""Where generated images go: one file, a folder (numbered files) or a name pattern."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

PLACEHOLDERS = ("seed", "index", "prompt")
_NUMBERED = re.compile(r"^(\d{5,})-")
_SLUG_LENGTH = 60


def output_paths(
    output: str,
    seeds: list[int],
    prompt: str,
    *,
    overwrite: bool = False,
    protected: Sequence[str | Path] = (),
) -> list[Path]:
    """The file of each image (image ``i`` has seed ``seeds[i]``), checked to be distinct PNG files.

    ``output`` is a ``.png`` file (one image), a pattern with ``{seed}``, ``{index}`` (0-based in the
    run) and ``{prompt}`` placeholders, or a folder, where images are numbered after the files there
    (``00012-<seed>.png``; more digits past 99,999), so nothing is overwritten. An existing file is
    an error unless ``overwrite``; a ``protected`` file (an input) never is replaced. Every folder must
    be writable (or creatable).
    """
    if "{" in output:
        paths = [_formatted(output, index, seed, prompt) for index, seed in enumerate(seeds)]
        if len(set(paths)) < len(paths):
            raise ValueError(
                f"the output pattern {output!r} gives several images one name; add {{index}} or {{seed}}"
            )
    elif Path(output).suffix and not Path(output).is_dir():
        if Path(output).suffix.lower() != ".png":
            raise ValueError(f"output {output} must be a .png file, a folder or a pattern (images are PNGs)")
        if len(seeds) > 1:
            raise ValueError(
                f"output {output} names one file, but {len(seeds)} images are made; pass a folder or a "
                "pattern such as 'out/{seed}.png'"
            )
        paths = [Path(output)]
    else:
        folder = Path(output)
        first = _next_number(folder)
        paths = [folder / f"{first + index:05d}-{seed}.png" for index, seed in enumerate(seeds)]
    for folder in {path.parent for path in paths}:
        _check_folder(folder)
    inputs = {Path(p).resolve() for p in protected}
    for path in paths:
        if path.resolve() in inputs:
            raise ValueError(f"output {path} is an input of this run; choose another -o")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another -o")
    return paths


def _check_folder(folder: Path) -> None:
    """``folder`` is a writable folder, or can be made in its nearest existing parent."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"cannot write into {folder}: {existing} is not writable; choose another -o")


def preview_path(path: Path) -> Path:
    """Where the Stage C preview of the image at ``path`` goes: ``<name>.preview.png`` beside it."""
    return path.with_name(f"{path.stem}.preview.png")


def prompt_slug(prompt: str) -> str:
    """The prompt as a file-name part: lower case letters, digits and dashes, at most 60 characters."""
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:_SLUG_LENGTH].strip("-")
    return slug or "image"


def _formatted(pattern: str, index: int, seed: int, prompt: str) -> Path:
    try:
        name = pattern.format(seed=seed, index=index, prompt=prompt_slug(prompt))
    except (KeyError, IndexError, ValueError) as error:
        names = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        raise ValueError(
            f"bad output pattern {pattern!r} ({error!r}); its placeholders are {names}"
        ) from None
    path = Path(name)
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def _next_number(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1
