"""Uploaded images: decoded from base64, checked, and kept under inputs/ as ``<sha256>.png``.

An upload costs what its header declares, not what it weighs: a 10 KiB PNG may declare 8192² pixels
(about 1 GB once decoded and hashed). So each upload's format and declared size are checked from its
header alone, before any pixel is decoded, and at most :data:`DECODE_SLOTS` requests hold decoded
images at once (the others wait their turn).

A request's uploads are kept within :func:`staged`: when the request is refused (any exception), the
files it added to inputs/ are removed again, unless a job or another request in flight uses them.
Files are written under a unique temporary name and renamed into place, so concurrent uploads of
the same image (one content-addressed name) never see each other's partial file.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import dataclasses
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import ParamSpec, TypeVar

import PIL.Image

from stable_cascade.engine import image_sha256, open_image_bytes
from stable_cascade.server.store import Store

#: The image formats accepted (PIL's names); others are refused before decoding.
FORMATS = ("PNG", "JPEG", "MPO", "WEBP", "BMP", "GIF")
#: The most pixels an upload may declare: the largest output a job may have (4096²); larger inputs
#: would only be scaled down.
MAX_UPLOAD_PIXELS = 4096 * 4096
#: Requests that may hold decoded uploads at once (each up to ~200 MB at the pixel limit).
DECODE_SLOTS = 2

P = ParamSpec("P")
T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Upload:
    """An uploaded input image, stored under the store's inputs/ as ``name``."""

    image: PIL.Image.Image
    name: str
    sha256: str


def decode_image(data: object, store: Store, field: str = "image") -> Upload:
    """A base64 image (a ``data:`` URL prefix allowed), its header checked before it is decoded, kept
    under inputs/ (a one-line ``ValueError`` naming ``field`` for what is not a sane image)."""
    image = _header(data, field)
    request = _request.get()
    with request.slot() if request is not None else _slot():
        try:
            rgb = image.convert("RGB")
        except (OSError, ValueError, SyntaxError, EOFError) as error:  # truncated or corrupt data
            raise ValueError(
                f"{field} could not be decoded ({error}); it may be truncated or corrupt"
            ) from None
        finally:
            image.close()
        return keep_image(rgb, store)


def peek_image(data: object, field: str = "image") -> tuple[int, int]:
    """The (width, height) a base64 upload declares, checked as :func:`decode_image` checks it (format,
    size), with no pixel decoded: for checking a request's other fields before its images."""
    with _header(data, field) as image:
        return image.size


def text_chunks(data: object, field: str = "image") -> dict[str, str]:
    """The text an upload carries before its pixels (a PNG's ``parameters``, its record), read from its
    header as :func:`peek_image` reads it: no pixel is decoded, nothing is kept."""
    with _header(data, field) as image:
        return {str(key): value for key, value in image.info.items() if isinstance(value, str)}


def keep_image(image: PIL.Image.Image, store: Store) -> Upload:
    """``image`` stored under the store's inputs/ as ``<sha256>.png`` (once; within :func:`staged`,
    until the request is refused)."""
    digest = image_sha256(image)
    path = store.inputs_dir / f"{digest}.png"
    request = _request.get()
    if request is not None:
        request.claim(path)
    if not path.exists():
        _write_png(image, path)
    return Upload(image, path.name, digest)


class Staged:
    """A request's uploads (see :func:`staged`); :meth:`run` runs the code that decodes them."""

    def __init__(self) -> None:
        self._claims: list[Path] = []
        self._holds_slot = False
        self._lock = threading.Lock()

    def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """``function(*args, **kwargs)`` with its uploads counted as this request's (in any thread)."""
        token = _request.set(self)
        try:
            return function(*args, **kwargs)
        finally:
            _request.reset(token)

    def claim(self, path: Path) -> None:
        _CLAIMS.claim(path)
        with self._lock:
            self._claims.append(path)

    @contextmanager
    def slot(self) -> Iterator[None]:
        """One decode slot, held from the request's first decode to its end (one per request, so
        requests with several uploads cannot hold each other's slots)."""
        with self._lock:
            first = not self._holds_slot
            self._holds_slot = True
        if first:
            _DECODES.acquire()
        yield

    def close(self, keep: bool) -> None:
        with self._lock:
            claims, self._claims = self._claims, []
            holds, self._holds_slot = self._holds_slot, False
        for path in claims:
            _CLAIMS.release(path, keep)
        if holds:
            _DECODES.release()


@contextmanager
def staged() -> Iterator[Staged]:
    """Scope of one request's uploads: kept when the block ends normally, removed (unless used
    elsewhere) when it raises, e.g. for a refused field or a full queue."""
    request = Staged()
    try:
        yield request
    except BaseException:
        request.close(keep=False)
        raise
    request.close(keep=True)


@dataclasses.dataclass
class _Claim:
    count: int  # requests in flight that use the file
    keep: bool  # the file existed before them, or one of them was accepted


class _Claims:
    """Files under inputs/ that requests in flight use, and whether to keep them when the last ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[Path, _Claim] = {}

    def claim(self, path: Path) -> None:
        with self._lock:
            claim = self._files.setdefault(path, _Claim(0, keep=path.exists()))
            claim.count += 1

    def release(self, path: Path, keep: bool) -> None:
        with self._lock:
            claim = self._files[path]
            claim.count -= 1
            claim.keep = claim.keep or keep
            if claim.count == 0:
                del self._files[path]
                if not claim.keep:
                    path.unlink(missing_ok=True)


_request: contextvars.ContextVar[Staged | None] = contextvars.ContextVar("upload_request", default=None)
_CLAIMS = _Claims()
_DECODES = threading.BoundedSemaphore(DECODE_SLOTS)


@contextmanager
def _slot() -> Iterator[None]:
    """A decode slot outside a request scope: held for the decode only."""
    with _DECODES:
        yield


def _write_png(image: PIL.Image.Image, path: Path) -> None:
    """``image`` as PNG at ``path``, atomically: a unique temporary name, synced, then renamed."""
    temporary = path.with_name(f".{path.stem}.{uuid.uuid4().hex}.partial.png")
    try:
        image.save(temporary, format="PNG")
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _header(data: object, field: str) -> PIL.Image.Image:
    """The upload opened for its header only (nothing decoded), its format and declared size checked."""
    if not isinstance(data, str):
        raise ValueError(f"{field} must be a base64-encoded image, got {type(data).__name__}")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64; send the image file's bytes base64-encoded") from None
    image = open_image_bytes(raw, field, max_pixels=MAX_UPLOAD_PIXELS, load=False)
    if image.format not in FORMATS:
        image.close()
        raise ValueError(
            f"{field} is a {image.format} image; send PNG, JPEG, WebP, BMP or GIF"
            if image.format
            else f"{field} is not an image file; send PNG, JPEG, WebP, BMP or GIF"
        )
    return image
