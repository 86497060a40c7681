"""AUTOMATIC1111's ``/sdapi/v1`` request fields → a job, and a finished job → A1111's response shape.

Mapping (fields not named here are ignored, as A1111 ignores what its scripts don't use):
``prompt``, ``negative_prompt``, ``seed`` (-1: random), ``width``, ``height``, ``batch_size``,
``n_iter`` (→ count), ``steps`` and ``cfg_scale`` (→ Stage C), ``sampler_name`` (or the older
``sampler_index``; A1111 names such as "Euler a", or ours; → Stage C's sampler), ``init_images`` +
``denoising_strength`` (img2img's strength), ``mask`` + ``inpainting_mask_invert`` (the model's
inpainting ControlNet) and the ControlNet extension's ``alwayson_scripts.controlnet.args[0]``
(``input_image``, ``module`` canny, ``weight``; see :mod:`stable_cascade.server.controls`). Our own
settings — ``preset``, ``prior_shift``, ``prior_rescale``, ``decoder_steps``, ``decoder_guidance``,
``decoder_sampler``, ``decoder_shift``, ``decoder_rescale`` — may be top-level fields or keys of
``override_settings``, which also takes ``sd_model_checkpoint`` (the model for this request only).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from stable_cascade.engine import Job, ModelSources
from stable_cascade.loading.bundles import BUNDLES
from stable_cascade.server.uploads import Upload

#: A1111's sampler names → ours (A1111 lists "name" and "aliases"; ours are aliases too).
SAMPLER_NAMES: dict[str, str] = {
    "Euler a": "euler_ancestral",
    "DDIM": "ddim",
    "DPM++ 2M": "dpmpp_2m",
    "DDPM": "ddpm",
}
_ALIASES = {"euler_ancestral": ["k_euler_a", "k_euler_ancestral"], "dpmpp_2m": ["k_dpmpp_2m"]}
#: Our own fields, accepted at the top level or in override_settings.
OWN_FIELDS = (
    "preset",
    "prior_shift",
    "prior_rescale",
    "decoder_steps",
    "decoder_guidance",
    "decoder_sampler",
    "decoder_shift",
    "decoder_rescale",
)
#: A1111 field → Job.create argument, for fields taken as they are.
_DIRECT = {
    "prompt": "prompt",
    "negative_prompt": "negative_prompt",
    "width": "width",
    "height": "height",
    "batch_size": "batch_size",
    "n_iter": "count",
    "steps": "prior_steps",
    "cfg_scale": "prior_guidance",
}


def sampler_list() -> list[dict[str, Any]]:
    """``GET /sdapi/v1/samplers``: A1111's shape."""
    return [
        {"name": name, "aliases": [ours, *_ALIASES.get(ours, [])], "options": {}}
        for name, ours in SAMPLER_NAMES.items()
    ]


def our_sampler(name: object) -> str:
    """Our sampler for an A1111 name (case-insensitive) or one of ours."""
    if isinstance(name, str):
        lowered = name.strip().lower()
        for a1111, ours in SAMPLER_NAMES.items():
            if lowered in (a1111.lower(), ours, *_ALIASES.get(ours, [])):
                return ours
    accepted = ", ".join(f"{a} ({o})" for a, o in SAMPLER_NAMES.items())
    raise ValueError(f"unknown sampler {name!r}; expected one of {accepted}")


def model_name(title: object) -> str:
    """A model of ours from an A1111 checkpoint title ("demo" or "demo [hash]")."""
    name = title.split(" [", 1)[0].strip() if isinstance(title, str) else title
    if name not in BUNDLES:
        raise ValueError(
            f"unknown model {title!r}; expected one of {', '.join(BUNDLES)} (GET /sdapi/v1/sd-models)"
        )
    return str(name)


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


def job_arguments(body: Mapping[str, Any], default_model: str, upload: Upload | None) -> dict[str, Any]:
    """The ``Job.create`` arguments of an A1111 txt2img (``upload`` None) or img2img request."""
    overrides = body.get("override_settings") or {}
    if not isinstance(overrides, Mapping):
        raise ValueError("override_settings must be a JSON object")
    arguments: dict[str, Any] = {
        ours: body[theirs] for theirs, ours in _DIRECT.items() if body.get(theirs) is not None
    }
    for field in OWN_FIELDS:
        for source in (body, overrides):
            if source.get(field) is not None:
                arguments[field] = source[field]
    seed = body.get("seed", -1)
    arguments["seed"] = None if seed == -1 or seed is None else seed
    sampler = body.get("sampler_name") or body.get("sampler_index")
    if sampler:
        arguments["prior_sampler"] = our_sampler(sampler)
    if "decoder_sampler" in arguments:
        arguments["decoder_sampler"] = our_sampler(arguments["decoder_sampler"])
    model = overrides.get("sd_model_checkpoint") or body.get("sd_model_checkpoint")
    arguments["models"] = ModelSources(model=model_name(model) if model else default_model)
    if upload is not None:
        arguments.update(task="img2img", input_image="init_images[0]", input_image_sha256=upload.sha256)
        if body.get("denoising_strength") is not None:
            arguments["strength"] = body["denoising_strength"]
    return arguments


def check_img2img(body: Mapping[str, Any]) -> object:
    """The one init image of an img2img request (several init images are refused)."""
    images = body.get("init_images")
    if not isinstance(images, list) or len(images) != 1:
        raise ValueError("init_images must be a list of one base64 image")
    return images[0]


def info(job: Job, infotexts: list[str], job_id: str) -> str:
    """A1111's ``info``: a JSON string describing what was made."""
    prior = job.prior or job.decoder
    names = {ours: theirs for theirs, ours in SAMPLER_NAMES.items()}
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
        "sampler_name": names.get(prior.sampler, prior.sampler),
        "cfg_scale": prior.guidance,
        "steps": prior.steps,
        "batch_size": job.batch_size,
        "restore_faces": False,
        "face_restoration_model": None,
        "sd_model_name": job.models.model,
        "sd_model_hash": None,
        "seed_resize_from_w": -1,
        "seed_resize_from_h": -1,
        "denoising_strength": job.strength,
        "extra_generation_params": {
            "Preset": job.preset,
            "Stage B steps": job.decoder.steps,
            "Stage B CFG scale": job.decoder.guidance,
            "Stage B sampler": job.decoder.sampler,
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
