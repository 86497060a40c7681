"""sha256 digests that records cite: of model and LoRA files, model folders and input images."""

from __future__ import annotations

import hashlib
from pathlib import Path

import PIL.Image

_CHUNK = 1 << 24  # bytes read at a time when hashing


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def image_sha256(image: PIL.Image.Image) -> str:
    """The digest of an image's RGB pixels and size: the same for the same picture in any file format
    or with any metadata (what a job records of its input image)."""
    rgb = image.convert("RGB")
    digest = hashlib.sha256(f"RGB {rgb.width}x{rgb.height}\n".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


class FileHasher:
    """sha256 digests of files (and model folders), computed once per file path, mtime and size.

    A folder's digest covers its ``*.safetensors`` files (sorted relative paths and their digests),
    which is what identifies a model folder's weights.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def sha256(self, path: str | Path) -> str:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.safetensors") if p.is_file())
            combined = hashlib.sha256()
            for file in files:
                combined.update(f"{file.relative_to(path).as_posix()}\0{self._file(file)}\n".encode())
            return combined.hexdigest()
        return self._file(path)

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]
