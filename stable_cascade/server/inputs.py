"""Requests → jobs: the native jobs API's body, uploaded images, and the errors users get back."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine import Job, ModelLibrary, check_inputs
from stable_cascade.fields import FIELDS
from stable_cascade.server import models
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
#: The fields a request names (models, controls and derived digests have their own ways).
CREATE_FIELDS = tuple(
    field.name
    for field in FIELDS
    if field.carried_by("api") and (field.kind != "image" or field.name == "input_image")
)


@dataclasses.dataclass(frozen=True)
class Served:
    """What a request's job is checked against: the store (uploads), the models folder, the default model."""

    store: Store
    library: ModelLibrary
    model: str


def native_job(body: object, served: Served) -> tuple[Job, Upload | None]:
    """The job of a ``POST /v1/jobs`` body (see the README): ``{"job": <a whole Job>, "image": ...}`` or
    ``{<field values>, "image": ...}`` (the field table's names; ``image``, ``control_image`` and ``mask``
    are base64 uploads); unknown keys are refused."""
    if not isinstance(body, Mapping):
        raise ValueError(f"the request body must be a JSON object, got {type(body).__name__}")
    fields = dict(body)
    if "job" not in fields:
        _check_fields(fields, served)
    upload = decode_image(fields.pop("image"), served.store) if "image" in fields else None
    if "job" in fields:
        extra = set(fields) - {"job", "control_image", "mask"}
        if extra:
            raise ValueError(
                "with 'job', give only 'image', 'control_image' and 'mask' besides it; unexpected: "
                + ", ".join(sorted(extra))
            )
        if not isinstance(fields["job"], Mapping):
            raise ValueError("'job' must be a JSON object (a job as GET /v1/jobs/{id} shows it)")
        job = attach_uploads(Job.from_dict(fields["job"], "job"), fields, served.store)
        if upload is not None:
            job = dataclasses.replace(job, input_image=job.input_image or "upload")
    else:
        controls = native_controls(fields, served.store, served.library)
        return created_job(fields, upload, controls, served), upload
    check_served(job, served)
    check_inputs(job, None if upload is None else upload.image)
    return job, upload


def request_arguments(fields: Mapping[str, Any], served: Served) -> dict[str, Any]:
    """A request's field values as ``Job.create`` arguments: the model and LoRAs by name (the prompt's
    ``<lora:…>`` too) as the models they stand for."""
    arguments = dict(fields)
    arguments.update(models.model_arguments(served.library, arguments.pop("model", served.model)))
    loras = models.lora_refs(served.library, arguments.pop("loras")) if "loras" in arguments else []
    models.prompt_arguments(served.library, arguments, loras)
    return arguments


def _check_fields(fields: Mapping[str, Any], served: Served) -> None:
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
    try:
        Job.create(**request_arguments(values, served), image_size=size)
    except TypeError as error:
        raise ValueError(f"a field has the wrong type: {error}") from None


def check_served(job: Job, served: Served) -> None:
    """Refuse what would make the server read files a client names: model files, LoRAs and ControlNet
    files other than the models folder's, and control images other than uploads."""
    models.check_served(job, served.library)
    check_served_controls(job, served.store, served.library)


def created_job(fields: dict[str, Any], upload: Upload | None, controls: list[Any], served: Served) -> Job:
    """``Job.create(**fields)`` with the model and LoRAs by name, the upload's name and sha256, and the
    controls."""
    unknown = set(fields) - set(CREATE_FIELDS) - {"model", "controlnet", "control_scale", "control_type"}
    if unknown:
        raise ValueError(
            f"unknown field(s) {', '.join(sorted(unknown))}; expected some of: model, image, "
            + ", ".join(CREATE_FIELDS)
        )
    if upload is not None:
        fields.setdefault("input_image", "upload")
        fields.setdefault("input_image_sha256", upload.sha256)
        if fields.get("task", "txt2img") == "txt2img":
            raise ValueError(
                "an image was sent with a txt2img job; set task to img2img, variation or reconstruct"
            )
    return checked_job({**request_arguments(fields, served), "controls": controls}, upload, served)


def checked_job(arguments: dict[str, Any], upload: Upload | None, served: Served) -> Job:
    """``Job.create(**arguments)`` for ``upload`` (or none), checked as the server runs it; a checkpoint
    of the models folder makes its base model's native size when the request gives none."""
    models.checkpoint_size(arguments)
    try:
        job = Job.create(image_size=None if upload is None else upload.image.size, **arguments)
    except TypeError as error:  # a value of a type the job's arithmetic cannot take
        raise ValueError(f"a field has the wrong type: {error}") from None
    check_served(job, served)
    check_inputs(job, None if upload is None else upload.image)
    return job


def one_line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
