"""AUTOMATIC1111's ``/sdapi/v1`` request fields → a job, and a finished job → A1111's response shape.

The mapping is the field table's (:mod:`stable_cascade.fields`): every field the table lets A1111
requests carry is taken by its A1111 name (``steps`` and ``cfg_scale`` → Stage C's, ``n_iter`` →
count, ``sampler_name`` or the older ``sampler_index`` → Stage C's sampler, A1111 names such as
"Euler a" or ours, ``denoising_strength`` → img2img's strength, ``sd_model_checkpoint`` → the model)
or by its own name (``decoder_steps``, ``prior_shift``, ``preset``, …), at the top level or in
``override_settings`` (which wins). ``seed`` -1 is random. The route is the task; img2img's
``init_images`` is the input image, its ``mask`` (+ ``inpainting_mask_invert``) the model's inpainting
ControlNet, and the ControlNet extension's ``alwayson_scripts.controlnet.args[0]`` (``input_image``,
``module`` canny, ``weight``) a control (see :mod:`stable_cascade.server.controls`). Other fields are
ignored, as A1111 ignores what its scripts don't use.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine import BUNDLES, Job
from stable_cascade.fields import A1111_SAMPLERS, BY_NAME, FIELDS

#: The fields an A1111 request may set, by the names it may use (A1111's first, then ours).
_NAMES = {
    field.name: tuple(name for name in (field.a1111, field.name) if name)
    for field in FIELDS
    if field.carried_by("a1111") and field.kind != "image"
}
_SAMPLER = BY_NAME["prior_sampler"]


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's shape."""
    names: dict[str, list[str]] = {}
    for name, ours in A1111_SAMPLERS.items():
        names.setdefault(ours, []).append(name)
    return [
        {"name": theirs[0], "aliases": [ours, *theirs[1:]], "options": {}} for ours, theirs in names.items()
    ]


def our_sampler(name: object) -> str:
    """Our sampler for an A1111 name (case-insensitive) or one of ours."""
    return _SAMPLER.choice(name, what="sampler")


def model_name(title: object) -> str:
    """A model of ours from an A1111 checkpoint title ("demo" or "demo [hash]")."""
    if not isinstance(title, str):
        raise ValueError(f"a model is named by text, got {type(title).__name__}; see GET /sdapi/v1/sd-models")
    name = title.split(" [", 1)[0].strip()
    if name not in BUNDLES:
        raise ValueError(
            f"unknown model {title!r}; expected one of {', '.join(BUNDLES)} (GET /sdapi/v1/sd-models)"
        )
    return name


def model_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: A1111's shape, one entry per named model."""
    return [
        {
            "title": name,
            "model_name": name,
            "hash": None,
            "sha256": None,
            "filename": b.prior_repo,
            "config": None,
        }
        for name, b in BUNDLES.items()
    ]


def job_arguments(body: Mapping[str, Any], default_model: str, image_sha256: str | None) -> dict[str, Any]:
    """The ``Job.create`` arguments of an A1111 txt2img (``image_sha256`` None) or img2img request (of
    the init image with that sha256)."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("override_settings must be a JSON object")
    arguments: dict[str, Any] = {}
    for field, names in _NAMES.items():
        for source in (body, overrides):
            for name in names:
                if source.get(name) is not None:
                    arguments[field] = source[name]
    if body.get("sampler_index") is not None and body.get("sampler_name") is None:
        arguments.setdefault("prior_sampler", body["sampler_index"])
    for stage in ("prior", "decoder"):
        if f"{stage}_sampler" in arguments:
            arguments[f"{stage}_sampler"] = our_sampler(arguments[f"{stage}_sampler"])
    if arguments.get("seed") == -1:
        arguments["seed"] = None  # random
    arguments["model"] = model_name(arguments["model"]) if "model" in arguments else default_model
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


def info(job: Job, infotexts: list[str], job_id: str) -> str:
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
        "cfg_scale": getattr(job, f"{stage}_guidance"),
        "steps": getattr(job, f"{stage}_steps"),
        "batch_size": job.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": job.strength,
        "extra_generation_params": {
            "Preset": job.preset,
            "Stage B steps": job.decoder_steps,
            "Stage B CFG scale": job.decoder_guidance,
            "Stage B sampler": job.decoder_sampler,
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
    fraction: float, eta: float, step: int, steps: int, jobs: int, preview: str | None
) -> dict[str, Any]:
    """``GET /sdapi/v1/progress``: A1111's shape."""
    return {
        "progress": fraction,
        "eta_relative": eta,
        "state": {
            "skipped": False,
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
