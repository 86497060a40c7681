"""Writing files and folders atomically: a reader (or a later run) sees the old one or the new one,
never a part, whatever stops the writer (a full disk, an error, a kill).

Each is written under a temporary name in the same folder (``.NAME.<12 hex>.tmp``, hidden), synced to
disk, renamed over its final name (``os.replace``, atomic within a file system) and the folder synced so
the rename survives a power cut. On any error the temporary is deleted and the old file is untouched.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

SUFFIX = ".tmp"
_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")


def temporary_name(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (``.NAME.<12 hex>.tmp``)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}{SUFFIX}")


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one :func:`temporary_name` gives (what a killed writer may leave)."""
    return _TEMPORARY.match(name) is not None


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; when the block ends it becomes ``path``
    (synced, renamed over it, the folder synced). On an error ``path`` is left as it was and the
    temporary removed."""
    path = Path(path)
    temporary = temporary_name(path)
    try:
        yield temporary
        _sync(temporary)
        os.replace(temporary, path)
    except OSError as error:
        _remove(temporary)
        if error.filename is None and error.errno:  # a write's error: name the file being written
            raise OSError(error.errno, error.strerror, str(path)) from error
        raise
    except BaseException:
        _remove(temporary)
        raise
    _sync_folder(path.parent)


def write_bytes(path: str | Path, data: bytes) -> None:
    """``path`` holds ``data``, atomically."""
    with atomic_path(path) as temporary, open(temporary, "xb") as file:
        file.write(data)


def write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` (UTF-8), atomically."""
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_folder(path: str | Path, replace: bool = False) -> Iterator[Path]:
    """A temporary folder beside ``path`` for the block to fill; when the block ends it becomes ``path``
    (an existing ``path`` is replaced only when ``replace``, else a ``FileExistsError``). On an error
    nothing is left: the temporary folder and the parent folders made for it are removed."""
    path = Path(path)
    if path.exists() and not replace:
        raise FileExistsError(f"{path} already exists; choose another destination or overwrite it")
    made = _make_folders(path.parent)
    temporary = temporary_name(path)
    try:
        temporary.mkdir()
        yield temporary
        _sync_tree(temporary)
        move_in(temporary, path, replace)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    _sync_folder(path.parent)


def move_in(temporary: Path, path: Path, replace: bool) -> None:
    """Rename the finished file or folder ``temporary`` to ``path``; an existing ``path`` (when
    ``replace``) is moved aside first and deleted after, so it is missing only between two renames."""
    if not (path.exists() or path.is_symlink()):
        os.rename(temporary, path)
        return
    if not replace:
        raise FileExistsError(f"{path} already exists; choose another destination or overwrite it")
    old = temporary_name(path)
    os.rename(path, old)
    try:
        os.rename(temporary, path)
    except BaseException:
        os.rename(old, path)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        _remove(old)


def _make_folders(folder: Path) -> list[Path]:
    """Make ``folder`` and its missing parents; the ones made, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    made = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:  # made meanwhile by another process: not ours to remove
            continue
        made.append(folder)
    return made


def _sync(path: Path) -> None:
    """Flush ``path``'s data to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sync_folder(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename in it) to the disk, where the system allows it."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open folders; its renames are durable once they return
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems refuse fsync on folders
        pass
    finally:
        os.close(descriptor)


def _sync_tree(folder: Path) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            _sync(Path(root) / name)
        _sync_folder(Path(root))


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
