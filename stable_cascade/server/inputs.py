"""Requests → jobs: the native jobs API's body, uploaded images, and the errors users get back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine import Job, ModelSources, check_inputs
from stable_cascade.fields import FIELDS
from stable_cascade.server.controls import (
    NATIVE_FIELDS,
    attach_uploads,
    check_served_controls,
    native_controls,
)
from stable_cascade.server.controls import UPLOADS as CONTROL_UPLOADS
from stable_cascade.server.store import Store
from stable_cascade.server.uploads import Upload, decode_image, peek_image

#: The sha256 an upload's job is checked with before the upload is decoded.
PLACEHOLDER = "0" * 64
#: The fields a request names (models, LoRAs, controls and derived digests have their own ways).
CREATE_FIELDS = tuple(
    field.name
    for field in FIELDS
    if field.carried_by("api") and (field.kind != "image" or field.name == "input_image")
)


def native_job(body: object, store: Store, default_model: str) -> tuple[Job, Upload | None]:
    """The job of a ``POST /v1/jobs`` body (see the README): ``{"job": <a whole Job>, "image": ...}`` or
    ``{<field values>, "image": ...}`` (the field table's names; ``image``, ``control_image`` and ``mask``
    are base64 uploads); unknown keys are refused."""
    if not isinstance(body, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
    fields = dict(body)
    if "job" not in fields:
        _check_fields(fields, default_model)
    upload = decode_image(fields.pop("image"), store) if "image" in fields else None
    if "job" in fields:
        extra = set(fields) - {"job", "control_image", "mask"}
        if extra:
            raise ValueError(
                "with 'job', give only 'image', 'control_image' and 'mask' besides it; unexpected: "
                + ", ".join(sorted(extra))
            )
        if not isinstance(fields["job"], Mapping):
            raise ValueError("'job' must be a JSON object (a job as GET /v1/jobs/{id} shows it)")
        job = attach_uploads(Job.from_dict(fields["job"], "job"), fields, store)
        if upload is not None:
            job = dataclasses.replace(job, input_image=job.input_image or "upload")
    else:
        controls = native_controls(fields, store)
        return created_job(fields, default_model, upload, store, controls), upload
    check_served(job, store)
    check_inputs(job, None if upload is None else upload.image)
    return job, upload


def _check_fields(fields: Mapping[str, Any], default_model: str) -> None:
    """The fields of a request checked as a job before its images are decoded (the controls' own
    checks follow, with their images)."""
    values = {k: v for k, v in fields.items() if k not in ("image", *CONTROL_UPLOADS, *NATIVE_FIELDS)}
    unknown = set(values) - set(CREATE_FIELDS) - {"model"}
    if unknown:  # named by created_job, after
        return
    image = fields.get("image")
    size = None if image is None else peek_image(image, "image")
    if image is not None:
        values.setdefault("input_image_sha256", PLACEHOLDER)
        if values.get("task", "txt2img") == "txt2img":
            return  # created_job names the mistake
    values.setdefault("model", default_model)
    try:
        Job.create(**values, image_size=size)
    except TypeError as error:
        raise ValueError(f"a field has the wrong type: {error}") from None


def check_served(job: Job, store: Store) -> None:
    """Refuse what would make the server read files a client names: model files, LoRAs, ControlNet
    files and control images other than uploads."""
    if job.models != ModelSources(model=job.models.model):
        raise ValueError(
            "the server runs named models only (see GET /sdapi/v1/sd-models); remove model paths"
        )
    if job.named_loras:
        raise ValueError("the server takes no LoRA files from requests; remove 'loras'")
    check_served_controls(job, store)


def created_job(
    fields: dict[str, Any], default_model: str, upload: Upload | None, store: Store, controls: list[Any]
) -> Job:
    """``Job.create(**fields)`` with ``model`` (a bundle name), the upload's name and sha256, and the
    controls."""
    model = fields.pop("model", default_model)
    unknown = set(fields) - set(CREATE_FIELDS) - {"controlnet", "control_scale", "control_type"}
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
    return checked_job({**fields, "model": model, "controls": controls}, upload, store)


def checked_job(arguments: dict[str, Any], upload: Upload | None, store: Store) -> Job:
    """``Job.create(**arguments)`` for ``upload`` (or none), checked as the server runs it."""
    try:
        job = Job.create(image_size=None if upload is None else upload.image.size, **arguments)
    except TypeError as error:  # a value of a type the job's arithmetic cannot take
        raise ValueError(f"a field has the wrong type: {error}") from None
    check_served(job, store)
    check_inputs(job, None if upload is None else upload.image)
    return job


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
