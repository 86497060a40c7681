"""Strict reading of a stored job (JSON from a PNG record, the server's requests): every key known,
every value of its field's type, or a one-line ``ValueError`` naming the key."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stable_cascade.loading.sources import ModelSources

if TYPE_CHECKING:
    from stable_cascade.engine.job import Job


def _kind(value: object) -> str:
    return "null" if value is None else type(value).__name__


def _typed(key: str, value: object, expected: str, source: str) -> Any:
    """``value`` if it has the ``expected`` type ("int", "float", "str", "str?", "float?")."""
    optional = expected.endswith("?")
    base = expected.rstrip("?")
    if value is None and optional:
        return None
    if base == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if base == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if base == "str" and isinstance(value, str):
        return value
    wanted = {"int": "a whole number", "float": "a number", "str": "text"}[base]
    raise ValueError(f"{source}: {key} must be {wanted}{' or null' if optional else ''}, got {_kind(value)}")


def _object(key: str, value: object, source: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{source}: {key} must be an object, got {_kind(value)}")
    return value


def _fields(
    cls: type[Any], data: Mapping[str, Any], types: Mapping[str, str], key: str, source: str
) -> dict[str, Any]:
    """The typed values of a flat dataclass ``cls`` from ``data`` (missing keys: the defaults)."""
    unknown = sorted(set(data) - set(types))
    if unknown:
        where = f" in {key}" if key else ""
        raise ValueError(f"{source}: unknown key {unknown[0]!r}{where}; known keys: {', '.join(types)}")
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
        and f.name not in data
    ]
    if missing:
        raise ValueError(f"{source}: {key} lacks {missing[0]!r}")
    prefix = f"{key}." if key else ""
    return {name: _typed(prefix + name, value, types[name], source) for name, value in data.items()}


_STAGE = {"steps": "int", "guidance": "float", "sampler": "str", "shift": "float", "rescale": "float"}
_LORA = {"path": "str", "scale": "float", "sha256": "str?"}
_CONTROL = {
    "controlnet": "str",
    "image": "str",
    "image_sha256": "str?",
    "mask": "str?",
    "mask_sha256": "str?",
    "scale": "float",
    "control_type": "str?",
    "controlnet_sha256": "str?",
}
_MODELS = {field.name: "str?" for field in dataclasses.fields(ModelSources)}
_SCALARS = {
    "task": "str",
    "prompt": "str",
    "negative_prompt": "str",
    "width": "int",
    "height": "int",
    "seed": "int",
    "batch_size": "int",
    "count": "int",
    "preset": "str",
    "strength": "float?",
    "input_image": "str?",
    "input_image_sha256": "str?",
    "dtype": "str",
}


def decode_job(cls: type[Job], data: Mapping[str, Any], source: str) -> Job:
    """A :class:`Job` of ``data`` (not yet validated)."""
    from stable_cascade.engine.control import ControlRef
    from stable_cascade.engine.job import LoraRef, StageJob

    data = _object("the job", data, source)
    known = {**_SCALARS, "prior": "", "decoder": "", "models": "", "loras": "", "controls": ""}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(known)}")
    values: dict[str, Any] = {
        name: _typed(name, value, _SCALARS[name], source) for name, value in data.items() if name in _SCALARS
    }
    for stage in ("prior", "decoder"):
        if stage in data:
            given = data[stage]
            if given is None and stage == "prior":
                values[stage] = None
                continue
            stage_data = _object(stage, given, source)
            values[stage] = StageJob(**_fields(StageJob, stage_data, _STAGE, stage, source))
    if "models" in data:
        values["models"] = ModelSources(
            **_fields(ModelSources, _object("models", data["models"], source), _MODELS, "models", source)
        )
    for key, ref, types in (("loras", LoraRef, _LORA), ("controls", ControlRef, _CONTROL)):
        if key in data:
            values[key] = _list(key, data[key], ref, types, source)
    return cls(**values)


def _list(key: str, items: object, ref: type[Any], types: Mapping[str, str], source: str) -> tuple[Any, ...]:
    """A tuple of flat dataclasses ``ref`` from a JSON list."""
    if not isinstance(items, (list, tuple)):
        raise ValueError(f"{source}: {key} must be a list, got {_kind(items)}")
    return tuple(
        ref(**_fields(ref, _object(f"{key}[{i}]", item, source), types, f"{key}[{i}]", source))
        for i, item in enumerate(items)
    )
