"""A job's inputs checked before any work: the job itself, its input image, image prompts and control
images."""

from __future__ import annotations

from pathlib import Path

import PIL.Image

from stable_cascade.engine.control import ControlImages, ControlRef, open_control
from stable_cascade.engine.hashing import image_sha256
from stable_cascade.engine.image_prompts import open_image_prompts
from stable_cascade.engine.job import Job
from stable_cascade.engine.loras import LoraRef


def check_inputs(job: Job, image: PIL.Image.Image | None) -> PIL.Image.Image | None:
    """Validate ``job``, its control images and its input image (given when needed, the one the job
    names); the image in RGB."""
    return checked_inputs(job, image)[0]


def checked_inputs(
    job: Job, image: PIL.Image.Image | None
) -> tuple[PIL.Image.Image | None, list[tuple[ControlRef, ControlImages]]]:
    """:func:`check_inputs`, and the job's control images, opened and checked once."""
    job.validate()
    controls = [(control, open_control(control)) for control in job.controls]
    open_image_prompts(job.image_prompts)
    open_image_prompts(job.negative_image_prompts, "negative image prompt")
    for adapter in job.ip_adapters:
        if not _exists(adapter):
            raise ValueError(f"IP-Adapter file {adapter.path} does not exist")
    if job.task == "txt2img":
        if image is not None:
            raise ValueError("txt2img takes no input image; use img2img, variation or reconstruct")
        return None, controls
    if image is None:
        raise ValueError(f"{job.task} needs an input image; pass the image the job was made for")
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"the input image must be a PIL image, got {type(image).__name__}")
    if image_sha256(image) != job.input_image_sha256:
        raise ValueError(
            f"the input image is not the one the job names (sha256 {str(job.input_image_sha256)[:12]}…); "
            "create the job with input_image_sha256=image_sha256(image)"
        )
    for lora in job.loras:
        if not _exists(lora):
            raise ValueError(f"LoRA file {lora.path} does not exist")
    return image.convert("RGB"), controls


def _exists(lora: LoraRef) -> bool:
    return Path(lora.path).is_file()
