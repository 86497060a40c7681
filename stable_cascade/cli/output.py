"""Where generated images go: one file, a folder (numbered files) or a name pattern; each name is
reserved before any work, so two runs never write one file."""

from __future__ import annotations

import contextlib
import os
import re
import string
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import PIL.Image

PLACEHOLDERS = ("seed", "index", "prompt")
#: Names reserved and folders made by this process, for :func:`release`.
_RESERVED: list[Path] = []
_MADE: list[Path] = []
_NUMBERED = re.compile(r"^(\d{5,})-")
_SLUG_LENGTH = 60


def output_paths(
    output: str,
    seeds: list[int],
    prompt: str,
    *,
    overwrite: bool = False,
    protected: Sequence[str | Path] = (),
    previews: bool = False,
) -> list[Path]:
    """The file of each image (image ``i`` has seed ``seeds[i]``), checked to be distinct PNG files and
    reserved.

    ``output`` is a ``.png`` file (one image), a pattern with ``{seed}``, ``{index}`` (0-based in the
    run) and ``{prompt}`` placeholders, or a folder, where images are numbered after the files there
    (``00012-<seed>.png``; more digits past 99,999), so nothing is overwritten. An existing file (or
    its ``<name>.preview.png`` with ``previews``) is an error unless ``overwrite``; a ``protected``
    file (an input) never is replaced. Every folder must be writable (or creatable). Each new name is
    reserved (made empty with an exclusive create), so two runs writing into one folder never take
    one name; the image is then written over it atomically, and :func:`release` removes what was
    reserved and never written.
    """
    if "{" in output:
        _check_pattern(output)
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
        _check_folder(Path(output))
        return _reserve_numbered(Path(output), seeds, previews)
    for folder in {path.parent for path in paths}:
        _check_folder(folder)
    inputs = {Path(p).resolve() for p in protected}
    files = [*paths, *(preview_path(path) for path in paths if previews)]
    for path in files:
        if path.resolve() in inputs:
            raise ValueError(f"output {path} is an input of this run; choose another -o")
        if path.exists() and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another -o")
    for path in files:
        _make_folder(path.parent)
        if not _reserve(path) and not overwrite:
            raise ValueError(f"{path} already exists; pass --overwrite to replace it, or choose another -o")
    return paths


def release() -> None:
    """Remove the names :func:`output_paths` reserved that no image was written over (a run that
    failed or was interrupted), and the folders it made that stayed empty."""
    while _RESERVED:
        path = _RESERVED.pop()
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()
    while _MADE:
        with contextlib.suppress(OSError):
            _MADE.pop().rmdir()  # only when empty


def save_image(image: PIL.Image.Image, path: Path) -> None:
    """Write ``image`` (a preview) as a PNG at ``path``, atomically (over its reservation)."""
    from stable_cascade.engine import atomic  # loads torch: only when writing

    with atomic.atomic_path(path) as temporary:
        image.save(temporary, format="PNG")


def _reserve_numbered(folder: Path, seeds: list[int], previews: bool) -> list[Path]:
    """Reserve the next free numbers of ``folder`` (under its lock, so two runs never pick one)."""
    _make_folder(folder)
    with _folder_lock(folder):
        while True:
            first = _next_number(folder)
            paths = [folder / f"{first + index:05d}-{seed}.png" for index, seed in enumerate(seeds)]
            files = [*paths, *(preview_path(path) for path in paths if previews)]
            reserved = [path for path in files if _reserve(path)]
            if len(reserved) == len(files):
                return paths
            for path in reserved:  # a writer that takes no lock took one: try the numbers after it
                _RESERVED.remove(path)
                path.unlink()


def _reserve(path: Path) -> bool:
    """Make ``path`` empty if it does not exist (exclusively); whether it was made."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    os.close(descriptor)
    _RESERVED.append(path)
    return True


def _make_folder(folder: Path) -> None:
    """Make ``folder`` and its missing parents, remembering them for :func:`release`."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    for made in reversed(missing):
        try:
            made.mkdir()
        except FileExistsError:  # made meanwhile by another run: not ours
            continue
        _MADE.append(made)


@contextlib.contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``folder`` (``flock`` on the folder itself, released when the block
    ends or the process dies); no lock where the system has none (Windows, some network file systems)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


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


def _check_pattern(pattern: str) -> None:
    """Only the documented placeholders, each by its bare name (``{seed}``, ``{index:03d}``)."""
    names = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
    try:
        fields = [(name, conversion) for _, name, _, conversion in string.Formatter().parse(pattern)]
    except ValueError as error:
        raise ValueError(f"bad output pattern {pattern!r} ({error}); its placeholders are {names}") from None
    for name, conversion in fields:
        if name is not None and (name not in PLACEHOLDERS or conversion is not None):
            shown = "{" + name + (f"!{conversion}" if conversion else "") + "}"
            raise ValueError(
                f"the output pattern {pattern!r} has {shown}; its placeholders are {names} (write a "
                "literal brace as {{ or }})"
            )


def _formatted(pattern: str, index: int, seed: int, prompt: str) -> Path:
    try:
        name = pattern.format(seed=seed, index=index, prompt=prompt_slug(prompt))
    except (KeyError, IndexError, ValueError, AttributeError, TypeError) as error:
        names = ", ".join(f"{{{p}}}" for p in PLACEHOLDERS)
        raise ValueError(f"bad output pattern {pattern!r} ({error}); its placeholders are {names}") from None
    path = Path(name)
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


def _next_number(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(numbers, default=-1) + 1
