"""Strict reading of a stored job (a PNG record, the server's store, a batch run's settings): every key a
field of the table, every value of its field's JSON type, or a one-line ``ValueError`` naming the key.

Jobs of earlier versions, with nested stage settings (``"prior": {"steps": …}``), models
(``"models": {…}``) and controls (``"controls": [{…}]``), are read too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from stable_cascade.engine.image_prompts import ImagePromptRef
from stable_cascade.engine.loras import IPAdapterRef, LoraRef
from stable_cascade.engine.resolve import CONTROL_FIELDS
from stable_cascade.fields import BY_NAME, LIST_KINDS, STAGE_KEYS, Field, defaults

_JSON_TYPES = {"int": "a whole number", "float": "a number", "loras": "a list of LoRAs"}
_LORA = {"path": "str", "scale": "float", "sha256": "str?"}
#: How jobs stored before the ``emphasis`` field encoded their prompts: as written.
EARLIER_EMPHASIS = "none"

#: Per list kind: the reference type of its items and their keys' JSON types ("?": may be null).
_ITEMS: dict[str, tuple[type[Any], dict[str, str]]] = {
    "loras": (LoraRef, _LORA),
    "ip_adapters": (IPAdapterRef, _LORA),
    "image_prompts": (ImagePromptRef, {"path": "str", "strength": "float", "sha256": "str?"}),
}


def kind_of(value: object) -> str:
    return "null" if value is None else type(value).__name__


def stored_values(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The typed field values of a stored job; fields it lacks take ``Job()``'s values."""
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: the job must be an object, got {kind_of(data)}")
    if _nested(data):
        data = flatten(data, source)
    unknown = sorted(set(data) - set(BY_NAME))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; known keys: {', '.join(BY_NAME)}")
    values = defaults()
    values["emphasis"] = EARLIER_EMPHASIS  # a job stored before the field existed
    values.update({name: typed(BY_NAME[name], value, source) for name, value in data.items()})
    for field in BY_NAME.values():
        if field.kind in LIST_KINDS:
            values[field.name] = tuple(values[field.name]) if values[field.name] else ()
    return values


def typed(field: Field, value: object, source: str) -> Any:
    """``value`` if it has the JSON type of ``field`` (None is checked by the job's validation)."""
    if value is None:
        return None
    kind = field.kind
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind in LIST_KINDS:
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{source}: {field.name} must be a list, got {kind_of(value)}")
        return tuple(_item(kind, item, f"{field.name}[{i}]", source) for i, item in enumerate(value))
    if kind not in ("int", "float") and isinstance(value, str):
        return value
    wanted = _JSON_TYPES.get(kind, "text")
    raise ValueError(f"{source}: {field.name} must be {wanted} or null, got {kind_of(value)}")


def _item(kind: str, item: object, key: str, source: str) -> Any:
    """One LoRA, IP-Adapter or image prompt of a stored job, every key of its JSON type."""
    cls, keys = _ITEMS[kind]
    if not isinstance(item, Mapping):
        raise ValueError(f"{source}: {key} must be an object, got {kind_of(item)}")
    unknown = sorted(set(item) - set(keys))
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r} in {key}; keys: {', '.join(keys)}")
    if "path" not in item:
        raise ValueError(f"{source}: {key} has no 'path'")
    checked: dict[str, Any] = {}
    for name, value in item.items():
        wanted = keys[name]
        ok = (value is None and wanted.endswith("?")) or (
            isinstance(value, (int, float)) and not isinstance(value, bool)
            if wanted == "float"
            else isinstance(value, str)
        )
        if not ok:
            raise ValueError(f"{source}: {key}.{name} must be {'a number' if wanted == 'float' else 'text'}")
        checked[name] = float(value) if wanted == "float" else value
    return cls(**checked)


def _nested(data: Mapping[str, Any]) -> bool:
    return (
        any(isinstance(data.get(key), Mapping) for key in ("prior", "decoder", "models"))
        or "controls" in data
    )


def flatten(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """An earlier version's nested job as field values."""
    flat = {k: v for k, v in data.items() if k not in ("prior", "decoder", "models", "controls")}
    for stage in ("prior", "decoder"):
        settings = data.get(stage)
        if settings is None:
            continue
        if not isinstance(settings, Mapping):
            raise ValueError(f"{source}: {stage} must be an object, got {kind_of(settings)}")
        unknown = sorted(set(settings) - set(STAGE_KEYS))
        if unknown:
            raise ValueError(
                f"{source}: unknown key {unknown[0]!r} in {stage}; known keys: {', '.join(STAGE_KEYS)}"
            )
        flat.update({f"{stage}_{key}": value for key, value in settings.items()})
    models = data.get("models", {})
    if not isinstance(models, Mapping):
        raise ValueError(f"{source}: models must be an object, got {kind_of(models)}")
    flat.update(models)
    controls = data.get("controls", [])
    if not isinstance(controls, list) or len(controls) > 1:
        raise ValueError(f"{source}: controls must be a list of at most one control")
    for control in controls:
        if not isinstance(control, Mapping):
            raise ValueError(f"{source}: controls[0] must be an object, got {kind_of(control)}")
        unknown = sorted(set(control) - set(CONTROL_FIELDS))
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r} in controls[0]")
        flat.update({CONTROL_FIELDS[key]: value for key, value in control.items()})
    return flat
