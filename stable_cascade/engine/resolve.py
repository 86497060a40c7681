"""What :meth:`Job.create <stable_cascade.engine.job.Job.create>` derives: every field's value from those
given, the preset, the model, the input image and the control image.

Values given where a field does not apply (Stage C settings for reconstruct, a strength for txt2img)
are refused; values not given take the field's derivation (see its ``derived`` text) or its default.
Local model paths become absolute, LoRA and IP-Adapter files are hashed and image prompts opened and
hashed, so records run anywhere.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stable_cascade.diffusion.presets import COMBINED_PRESETS, DEFAULT_PRESET
from stable_cascade.engine.control import ControlRef, resolve_control, super_resolution_size
from stable_cascade.engine.image_prompts import resolve_image_prompts
from stable_cascade.engine.loras import IPAdapterRef, preset_loras, resolve_loras
from stable_cascade.fields import ALIASES, BY_NAME, FIELDS, STAGE_KEYS, TASKS
from stable_cascade.fields import checks as limits
from stable_cascade.loading.bundles import BUNDLES, DEFAULT_BUNDLE
from stable_cascade.loading.native import native_size
from stable_cascade.loading.sources import ModelSources

MODEL_FIELDS = tuple(field.name for field in dataclasses.fields(ModelSources))
#: ControlRef attribute → the job's control field.
CONTROL_FIELDS = {
    "controlnet": "controlnet",
    "image": "control_image",
    "image_sha256": "control_image_sha256",
    "mask": "mask",
    "mask_sha256": "mask_sha256",
    "scale": "control_scale",
    "control_type": "control_type",
    "controlnet_sha256": "controlnet_sha256",
}


def random_seed() -> int:
    return secrets.randbelow(2**32)


def resolved_values(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every field's value for a job of ``given`` (see the module's docstring)."""
    values = _given(given)
    task = limits.check_choice("task", values.setdefault("task", "txt2img"), TASKS)
    limits.check_choice("preset", values.setdefault("preset", DEFAULT_PRESET), COMBINED_PRESETS)
    limits.check_choice("model", values.setdefault("model", DEFAULT_BUNDLE), BUNDLES)
    for name, value in values.items():
        if not BY_NAME[name].applies(task, values) and value not in ((), []):
            raise ValueError(BY_NAME[name].not_applying(task))
    values.update(_absolute_models(values))
    if "loras" in values:
        values["loras"] = resolve_loras(values["loras"])
    if "ip_adapters" in values:
        values["ip_adapters"] = resolve_loras(values["ip_adapters"], IPAdapterRef)
    for name in ("image_prompts", "negative_image_prompts"):
        if name in values:
            values[name] = resolve_image_prompts(values[name], BY_NAME[name].label.removesuffix("s"))
    control_size = _resolve_control(values)
    preset = COMBINED_PRESETS[values["preset"]]
    if preset.adapters is not None:
        values["loras"] = _preset_loras(preset.adapters, task, values)
    for stage in ("prior", "decoder"):
        settings = getattr(preset, stage)
        if BY_NAME[f"{stage}_steps"].applies(task, values):
            for key in STAGE_KEYS:
                values.setdefault(f"{stage}_{key}", getattr(settings, key))
    super_resolution = control_size is not None and values["control_type"] == "super_resolution"
    if super_resolution and "width" not in values and "height" not in values:
        values["width"], values["height"] = super_resolution_size(control_size)  # type: ignore[arg-type]
    values["width"], values["height"] = _size(task, values, given.get("image_size"))
    values.setdefault("seed", random_seed())
    if task == "img2img":
        values.setdefault("strength", BY_NAME["strength"].default)
    return {
        field.name: values.get(field.name, field.default if field.applies(task, values) else field.empty)
        for field in FIELDS
    }


def _given(given: Mapping[str, Any]) -> dict[str, Any]:
    """The given field values (None: not given), ``models`` and ``controls`` spread into their fields."""
    values = {ALIASES.get(name, name): value for name, value in given.items() if value is not None}
    models, controls = values.pop("models", None), values.pop("controls", ())
    values.pop("image_size", None)
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(unknown)}; expected some of: {', '.join(BY_NAME)}")
    if models is not None:
        if not isinstance(models, ModelSources):
            raise ValueError(f"models must be a ModelSources, got {type(models).__name__}")
        for name in MODEL_FIELDS:
            if getattr(models, name) is not None:
                values.setdefault(name, getattr(models, name))
    if not isinstance(controls, Sequence) or len(controls) > 1:
        count = len(controls) if isinstance(controls, Sequence) else controls
        raise ValueError(f"a job takes one ControlNet, got {count}; run one control per job")
    for control in controls:
        for attribute, name in CONTROL_FIELDS.items():
            if getattr(control, attribute) is not None:
                values.setdefault(name, getattr(control, attribute))
    return values


def _preset_loras(kind: str, task: str, values: Mapping[str, Any]) -> tuple[Any, ...]:
    """The job's LoRAs with those the preset needs (see :func:`preset_loras`)."""
    if not BY_NAME["loras"].applies(task, values):
        raise ValueError(
            f"the {values['preset']} preset attaches {kind.upper()} LoRAs, which {task} does not take (LoRAs "
            f"serve the tasks that run Stage C: {', '.join(BY_NAME['loras'].tasks)}); choose another preset"
        )
    own = [stage for stage in ("prior", "decoder") if values.get(stage)]
    return preset_loras(kind, values.get("loras", ()), values["model"], ("prior", "decoder"), own)


def spread(changes: Mapping[str, Any]) -> dict[str, Any]:
    """``changes`` with ``models`` (a :class:`ModelSources`) and ``controls`` (none or one
    :class:`ControlRef`) as the fields they stand for: every model field, every control field."""
    values = dict(changes)
    if "models" in values:
        models = values.pop("models")
        values.update({name: getattr(models, name) for name in MODEL_FIELDS})
        values["model"] = models.model or DEFAULT_BUNDLE
    if "controls" in values:
        control = next(iter(values.pop("controls")), None)
        values.update({name: getattr(control, a, None) for a, name in CONTROL_FIELDS.items()})
    return values


def _absolute_models(values: Mapping[str, Any]) -> dict[str, str]:
    """The local model paths made absolute (so records run anywhere)."""
    return {
        name: str(Path(value).resolve())
        for name in MODEL_FIELDS
        if name != "model" and isinstance(value := values.get(name), str) and Path(value).exists()
    }


def _resolve_control(values: dict[str, Any]) -> tuple[int, int] | None:
    """Resolve the job's control in place (absolute paths, sha256s, control type); the control image's
    size, or None without a ControlNet."""
    if values.get("controlnet") is None:
        return None
    if values.get("control_image") is None:
        raise ValueError(
            "a ControlNet needs its control image (control_image): the image that steers the result"
        )
    given: dict[str, Any] = {attribute: values.get(name) for attribute, name in CONTROL_FIELDS.items()}
    given["scale"] = values.get("control_scale", BY_NAME["control_scale"].default)
    ref, size = resolve_control(ControlRef(**given))
    for attribute, name in CONTROL_FIELDS.items():
        values[name] = getattr(ref, attribute)
    return size


def _size(task: str, values: Mapping[str, Any], image: tuple[int, int] | None) -> tuple[int, int]:
    """The output size: the one given, else reconstruct's input size, else the model's native one."""
    width, height = values.get("width"), values.get("height")
    if (width is None) != (height is None) and task == "reconstruct":
        raise ValueError("give reconstruct both a width and a height, or neither (the image's size is kept)")
    if task == "reconstruct" and width is None and height is None:
        if image is None:
            raise ValueError("reconstruct needs the input image's size (image_size) or a width and height")
        return _multiple_below(image[0]), _multiple_below(image[1])
    sources = ModelSources(**{name: values.get(name) for name in MODEL_FIELDS})
    native = native_size(sources) or limits.DEFAULT_SIZE  # the demo and models derived from it: 128
    return (native if width is None else width), (native if height is None else height)


def _multiple_below(side: int) -> int:
    return max(limits.SIZE_MULTIPLE, side // limits.SIZE_MULTIPLE * limits.SIZE_MULTIPLE)
