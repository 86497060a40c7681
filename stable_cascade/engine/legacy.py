"""Records that are not this version's JSON: schema 1 (the earlier flat record) and infotexts alone
(ours, or another tool's), turned into :class:`~stable_cascade.engine.record.ImageRecord` fields."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from stable_cascade.diffusion.presets import PRESETS, get_preset
from stable_cascade.engine.job import TASKS, Job, StageJob
from stable_cascade.loading.sources import ModelSources

_FIELD = re.compile(r'\s*([\w .\-]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
UNKNOWN_IMAGE = "unknown"  # the input image's hash when a record has none


def schema_1_record(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The record fields of a schema 1 record (one flat object per image)."""
    try:
        stages = {
            name: None if data.get(name) is None else StageJob(**data[name]) for name in ("prior", "decoder")
        }
        models = ModelSources(
            **{
                k: v
                for k, v in dict(data.get("models", {})).items()
                if k in ModelSources.__dataclass_fields__
            }
        )
        job = Job(
            task=data["task"],
            prompt=data["prompt"],
            negative_prompt=data["negative_prompt"],
            width=data["width"],
            height=data["height"],
            seed=data["seed"],
            preset=data["preset"],
            prior=stages["prior"],
            decoder=stages["decoder"],  # type: ignore[arg-type]  # validated below
            strength=data.get("strength"),
            input_image=data.get("input_image"),
            input_image_sha256=data.get("input_image_sha256"),
            models=models,
            dtype=data.get("dtype", "auto"),
        )
        job.validate()
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
    """Record fields from an infotext alone: what it lacks comes from the preset.

    The last line holding ``Steps:`` carries the settings; a ``Negative prompt:`` line starts the
    negative prompt; everything before it is the prompt.
    """
    lines = text.strip().split("\n")
    settings_at = max((i for i, line in enumerate(lines) if "Steps:" in line), default=None)
    if settings_at is None:
        raise ValueError(f"{source}: no 'Steps:' line in its parameters text")
    fields = {m.group(1).strip(): _unquoted(m.group(2).strip()) for m in _FIELD.finditer(lines[settings_at])}
    prompt_lines, negative_lines = lines[:settings_at], []
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            prompt_lines, negative_lines = prompt_lines[:i], prompt_lines[i:]
            break
    negative = "\n".join(negative_lines).removeprefix("Negative prompt:").strip()
    try:
        job = _job(fields, "\n".join(prompt_lines).strip(), negative)
        job.validate()
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source}: cannot read its parameters text ({error})") from None
    return {"job": job, "seed": job.seed, "width": job.width, "height": job.height}


def _job(fields: Mapping[str, str], prompt: str, negative: str) -> Job:
    preset = fields.get("Preset", "reference")
    if preset not in PRESETS:
        preset = "reference"
    defaults = get_preset(preset, PRESETS)
    steps, cfg, samplers, shifts = (
        fields.get(k, "").split("+") for k in ("Steps", "CFG scale", "Sampler", "Shift")
    )
    task = fields.get("Task", "txt2img")
    task = task if task in TASKS else "txt2img"
    staged = [("prior", defaults.prior), ("decoder", defaults.decoder)]
    if task == "reconstruct":
        staged = staged[1:]
    stages: dict[str, StageJob] = {}
    for i, (name, default) in enumerate(staged):
        stages[name] = StageJob(
            steps=int(_item(steps, i) or default.num_inference_steps),
            guidance=float(_item(cfg, i) or default.guidance_scale),
            sampler=_item(samplers, i) or default.sampler,
            shift=float(_item(shifts, i) or default.shift),
            rescale=default.guidance_rescale,
        )
    width, _, height = fields.get("Size", "1024x1024").partition("x")
    strength = fields.get("Denoising strength")
    return Job(
        task=task,  # type: ignore[arg-type]  # one of TASKS
        prompt=prompt,
        negative_prompt=negative,
        seed=int(fields["Seed"]),
        width=int(width),
        height=int(height),
        preset=preset,
        prior=stages.get("prior"),
        decoder=stages["decoder"],
        strength=(float(strength) if strength else 0.8) if task == "img2img" else None,
        input_image_sha256=None if task == "txt2img" else UNKNOWN_IMAGE,
    )


def _item(values: list[str], index: int) -> str:
    """Value ``index`` of a ``C+B`` pair; a single value serves both stages."""
    if not values or values == [""]:
        return ""
    return values[index] if index < len(values) else values[-1]


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value[1:-1]
    return value
