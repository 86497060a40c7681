"""Records that are not this version's JSON: schema 1 (the earliest flat record) and infotexts alone
(ours, or another tool's), turned into :class:`~stable_cascade.engine.record.ImageRecord` fields."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine.job import Job
from stable_cascade.fields import IMAGE_TASKS, infotext
from stable_cascade.fields.prompts import extra_networks

logger = logging.getLogger(__name__)

UNKNOWN_IMAGE = "unknown"  # the input image's hash when a record has none
_SCHEMA_1_JOB = ("task", "prompt", "negative_prompt", "width", "height", "seed", "preset", "prior",
                 "decoder", "strength", "input_image", "input_image_sha256", "dtype")  # fmt: skip


def schema_1_record(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The record fields of a schema 1 record (one flat object per image, its job's stages nested)."""
    try:
        job_data = {key: data[key] for key in _SCHEMA_1_JOB if key in data}
        models = data.get("models", {})
        known = ("model", "prior", "decoder", "stage_a", "effnet", "previewer", "components")
        job_data["models"] = {k: v for k, v in dict(models).items() if k in known}
        job = Job.from_dict(job_data, source)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{source} is not a valid schema 1 record: {error}") from None
    return {
        "job": job,
        "seed": job.seed,
        "width": job.width,
        "height": job.height,
        "model_sha256": dict(data.get("model_sha256", {})),
        "version": str(data.get("version", "unknown")),
    }


def parse_infotext(text: str, source: str = "the parameters text") -> dict[str, Any]:
    """Record fields from an infotext alone (:func:`stable_cascade.fields.infotext.parse`): what it
    lacks comes from the preset; an image task's input image is unknown (its sha256 ``unknown``); the
    prompt's ``<lora:…>`` tags are left out, with a warning (the text does not say where the files are)."""
    values = infotext.parse(text, source)
    prompt, networks = extra_networks(values["prompt"])
    values["prompt"] = prompt.strip()
    if networks:
        tags = ", ".join(f"<{kind}:{':'.join(arguments)}>" for kind, arguments in networks)
        logger.warning(
            "%s: its prompt names %s, which its text alone cannot load; they are left out", source, tags
        )
    if values.get("task", "txt2img") in IMAGE_TASKS:
        values["input_image_sha256"] = UNKNOWN_IMAGE
    try:
        job = Job.create(**values)
    except ValueError as error:
        raise ValueError(f"{source}: cannot read its parameters text ({error})") from None
    return {"job": job, "seed": job.seed, "width": job.width, "height": job.height}
