"""AUTOMATIC1111's ``/sdapi/v1`` request fields → a job, and a finished job → A1111's response shape.

The mapping is the field table's (:mod:`stable_cascade.fields`): every field the table lets A1111
requests carry is taken by its A1111 name (``steps`` and ``cfg_scale`` → Stage C's, ``n_iter`` →
count, ``sampler_name`` or the older ``sampler_index`` → Stage C's sampler, by A1111's names such as
"Euler a" — a scheduler suffix, "DPM++ 2M Karras", is taken — or ours, ``denoising_strength`` →
img2img's strength, ``sd_model_checkpoint`` → the model, ``emphasis`` → how prompt weighting acts) or
by its own name (``decoder_steps``, ``prior_shift``, ``preset``, …), at the top level or in
``override_settings`` (which wins). ``seed`` -1 is random; ``<lora:name:weight>`` in the prompt attaches
the models folder's LoRA. The route is the task; img2img's ``init_images`` is the input image, its
``mask`` (+ ``inpainting_mask_invert``) the model's inpainting ControlNet, and the ControlNet
extension's units (``alwayson_scripts``, see :mod:`stable_cascade.server.controls`) a control.
``enable_hr`` (the hires fix) is refused: Stable Cascade makes large images at once, so ask for the
size itself. Other fields are ignored, as A1111 ignores what its scripts don't use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine import Job
from stable_cascade.fields import A1111_SAMPLERS, BY_NAME, FIELDS
from stable_cascade.fields import a1111 as names
from stable_cascade.server import models
from stable_cascade.server.controls import flag
from stable_cascade.server.inputs import Served

#: The fields an A1111 request may set, by the names it may use (A1111's first, then ours).
_NAMES = {
    field.name: tuple(name for name in (field.a1111, field.name) if name)
    for field in FIELDS
    if field.carried_by("a1111") and field.kind != "image" and field.name != "model"
}
_SAMPLER = BY_NAME["prior_sampler"]
HIRES = (
    "enable_hr (the hires fix) is not supported: Stable Cascade makes large images at once; ask for the "
    "size you want with width and height instead"
)


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's shape."""
    grouped: dict[str, list[str]] = {}
    for name, ours in A1111_SAMPLERS.items():
        grouped.setdefault(ours, []).append(name)
    return [
        {"name": theirs[0], "aliases": [ours, *theirs[1:]], "options": {}} for ours, theirs in grouped.items()
    ]


def job_arguments(body: Mapping[str, Any], served: Served, image_sha256: str | None) -> dict[str, Any]:
    """The ``Job.create`` arguments of an A1111 txt2img (``image_sha256`` None) or img2img request (of
    the init image with that sha256)."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("override_settings must be a JSON object")
    if flag(body.get("enable_hr", False), "enable_hr"):
        raise ValueError(HIRES)
    arguments: dict[str, Any] = {}
    for field, aliases in _NAMES.items():
        for source in (body, overrides):
            for name in aliases:
                if source.get(name) is not None:
                    arguments[field] = source[name]
    if body.get("sampler_index") is not None and body.get("sampler_name") is None:
        arguments.setdefault("prior_sampler", body["sampler_index"])
    for source in (body, overrides):
        if source.get("scheduler") is not None:
            names.scheduler(source["scheduler"])  # each runs as Stable Cascade's own schedule
    for name, value in list(arguments.items()):
        if name.endswith("_sampler"):
            arguments[name] = names.sampler(value)
        elif BY_NAME[name].kind == "choice" and BY_NAME[name].choice_names:
            arguments[name] = BY_NAME[name].choice(value)
    if arguments.get("seed") == -1:
        arguments["seed"] = None  # random
    model = next((s.get("sd_model_checkpoint") or s.get("model") for s in (overrides, body)
                  if s.get("sd_model_checkpoint") or s.get("model")), None)  # fmt: skip
    arguments.update(models.model_arguments(served.library, model or served.model))
    models.prompt_arguments(served.library, arguments, [])
    if image_sha256 is None:
        arguments.pop("strength", None)  # txt2img: A1111's hires fix strength, which we don't have
    else:
        arguments.update(task="img2img", input_image="init_images[0]", input_image_sha256=image_sha256)
    return arguments


def check_img2img(body: Mapping[str, Any]) -> object:
    """The one init image of an img2img request (several init images are refused)."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise ValueError("init_images must be a list of one base64 image")
    return images[0]


def info(job: Job, infotexts: list[str], job_id: str, model: str) -> str:
    """A1111's ``info``: a JSON string describing what was made."""
    stage = "decoder" if job.prior_steps is None else "prior"
    data = {
        "prompt": job.prompt,
        "all_prompts": [job.prompt] * job.images,
        "negative_prompt": job.negative_prompt,
        "all_negative_prompts": [job.negative_prompt] * job.images,
        "seed": job.seed,
        "all_seeds": job.seeds,
        "subseed": -1,
        "all_subseeds": [-1] * job.images,
        "subseed_strength": 0,
        "width": job.width,
        "height": job.height,
        "sampler_name": _SAMPLER.name_of(getattr(job, f"{stage}_sampler")),
        "scheduler": "Automatic",
        "cfg_scale": getattr(job, f"{stage}_guidance"),
        "steps": getattr(job, f"{stage}_steps"),
        "batch_size": job.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": job.strength,
        "extra_generation_params": {
            "Preset": job.preset,
            "Stage B steps": job.decoder_steps,
            "Stage B CFG scale": job.decoder_guidance,
            "Stage B sampler": _SAMPLER.name_of(job.decoder_sampler),
        },
        "index_of_first_image": 0,
        "infotexts": infotexts,
        "styles": [],
        "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
        "clip_skip": 1,
        "is_using_inpainting_conditioning": False,
        "job_id": job_id,
        "job": job.to_dict(),
    }
    return json.dumps(data)


def progress(
    fraction: float, eta: float, step: int, steps: int, jobs: int, preview: str | None, skipped: bool = False
) -> dict[str, Any]:
    """``GET /sdapi/v1/progress``: A1111's shape."""
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": skipped,
            "interrupted": False,
            "stopping_generation": False,
            "job": "",
            "job_count": jobs,
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"),
            "job_no": 0,
            "sampling_step": step,
            "sampling_steps": steps,
        },
        "current_image": preview,
        "textinfo": None,
    }
