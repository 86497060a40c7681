"""Uploaded images: decoded from base64, checked like the CLI's input images, kept under inputs/."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
import uuid

import PIL.Image

from stable_cascade.engine import image_sha256, open_image
from stable_cascade.server.store import Store


@dataclasses.dataclass(frozen=True)
class Upload:
    """An uploaded input image, stored under the store's inputs/ as ``name``."""

    image: PIL.Image.Image
    name: str
    sha256: str


def decode_image(data: object, store: Store, field: str = "image") -> Upload:
    """A base64 image (a ``data:`` URL prefix allowed), checked like the CLI's input images and kept."""
    if not isinstance(data, str):
        raise ValueError(f"{field} must be a base64-encoded image, got {type(data).__name__}")
    text = data.split(",", 1)[1] if data.startswith("data:") else data
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{field} is not valid base64; send the image file's bytes base64-encoded") from None
    upload = store.inputs_dir / f".upload-{uuid.uuid4().hex}"
    upload.write_bytes(raw)
    try:
        image = open_image(upload)
    except ValueError as error:
        raise ValueError(str(error).replace(str(upload), field)) from None
    finally:
        upload.unlink()
    return keep_image(image, store)


def keep_image(image: PIL.Image.Image, store: Store) -> Upload:
    """``image`` stored under the store's inputs/ as ``<sha256>.png`` (once)."""
    digest = image_sha256(image)
    name = f"{digest}.png"
    if not (store.inputs_dir / name).exists():
        partial = store.inputs_dir / f".{name}.partial.png"
        image.save(partial, format="PNG")
        os.replace(partial, store.inputs_dir / name)
    return Upload(image, name, digest)
