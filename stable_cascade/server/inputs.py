"""Requests → jobs: the native jobs API's body, uploaded images, and the errors users get back."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import inspect
import os
import uuid
from collections.abc import Mapping
from typing import Any

import PIL.Image

from stable_cascade.engine import Job, ModelSources, check_inputs, image_sha256, open_image
from stable_cascade.server.store import Store

#: The keyword arguments of Job.create a request may give (models and LoRAs have their own fields).
CREATE_FIELDS = tuple(
    name for name in inspect.signature(Job.create).parameters if name not in ("models", "loras", "image_size")
)


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
    digest = image_sha256(image)
    name = f"{digest}.png"
    if not (store.inputs_dir / name).exists():
        partial = store.inputs_dir / f".{name}.partial.png"
        image.save(partial, format="PNG")
        os.replace(partial, store.inputs_dir / name)
    return Upload(image, name, digest)


def native_job(body: object, store: Store, default_model: str) -> tuple[Job, Upload | None]:
    """The job of a ``POST /v1/jobs`` body (see the README): ``{"job": <a whole Job>, "image": ...}`` or
    ``{<Job.create arguments>, "model": ..., "image": ...}``; unknown keys are refused."""
    if not isinstance(body, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
    fields = dict(body)
    upload = decode_image(fields.pop("image"), store) if "image" in fields else None
    if "job" in fields:
        extra = set(fields) - {"job"}
        if extra:
            raise ValueError(
                f"with 'job', give only 'image' besides it; unexpected: {', '.join(sorted(extra))}"
            )
        if not isinstance(fields["job"], Mapping):
            raise ValueError("'job' must be a JSON object (a job as GET /v1/jobs/{id} shows it)")
        job = Job.from_dict(fields["job"], "job")
        if upload is not None:
            job = dataclasses.replace(job, input_image=job.input_image or "upload")
    else:
        return created_job(fields, default_model, upload), upload
    check_served(job)
    check_inputs(job, None if upload is None else upload.image)
    return job, upload


def check_served(job: Job) -> None:
    """Refuse what would make the server read files a client names: model files and LoRAs."""
    if job.models != ModelSources(model=job.models.model):
        raise ValueError(
            "the server runs named models only (see GET /sdapi/v1/sd-models); remove model paths"
        )
    if job.loras:
        raise ValueError("the server takes no LoRA files from requests; remove 'loras'")


def created_job(fields: dict[str, Any], default_model: str, upload: Upload | None) -> Job:
    """``Job.create(**fields)`` with ``model`` (a bundle name) and the upload's name and sha256."""
    model = fields.pop("model", default_model)
    unknown = set(fields) - set(CREATE_FIELDS)
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(sorted(unknown))}; expected some of: model, image, "
            + ", ".join(CREATE_FIELDS)
        )
    if not isinstance(model, str):
        raise ValueError(f"model must be a model's name, got {model!r}")
    if upload is not None:
        fields.setdefault("input_image", "upload")
        fields.setdefault("input_image_sha256", upload.sha256)
        if fields.get("task", "txt2img") == "txt2img":
            raise ValueError(
                "an image was sent with a txt2img job; set task to img2img, variation or reconstruct"
            )
    return checked_job({**fields, "models": ModelSources(model=model)}, upload)


def checked_job(arguments: dict[str, Any], upload: Upload | None) -> Job:
    """``Job.create(**arguments)`` for ``upload`` (or none), checked as the server runs it."""
    try:
        job = Job.create(image_size=None if upload is None else upload.image.size, **arguments)
    except TypeError as error:  # a value of a type the job's arithmetic cannot take
        raise ValueError(f"a field has the wrong type: {error}") from None
    check_served(job)
    check_inputs(job, None if upload is None else upload.image)
    return job


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
