"""The field table as the server shows it: ``GET /v1/fields`` (the web page builds its form from it) and
the JSON schema of ``POST /v1/jobs`` bodies (the native API's ``/docs``)."""

from __future__ import annotations

from typing import Any

from stable_cascade.diffusion.presets import COMBINED_PRESETS
from stable_cascade.fields import checks
from stable_cascade.fields.field import Field
from stable_cascade.fields.table import FIELDS, STAGE_KEYS

_JSON_TYPES = {"int": "integer", "float": "number", "loras": "array", "ip_adapters": "array"}
#: What the API takes for an image field: an upload.
UPLOAD = "a base64 image (or a data: URL); image files are never named"


def preset_values(field: Field) -> dict[str, Any]:
    """A stage setting's value in each preset (``{}`` for other fields)."""
    stage, _, key = field.name.partition("_")
    if stage not in ("prior", "decoder") or key not in STAGE_KEYS:
        return {}
    return {name: getattr(getattr(preset, stage), key) for name, preset in COMBINED_PRESETS.items()}


def describe(field: Field) -> dict[str, Any]:
    """One field for the page: what builds its control and checks its value."""
    return {
        "name": field.name,
        "kind": field.kind,
        "label": field.label,
        "help": field.help,
        "group": field.group,
        "default": field.default,
        "derived": field.derived,
        "low": field.low,
        "high": field.high,
        "choices": list(field.choices),
        "choice_names": {value: field.name_of(value) for value in field.choices},
        "optional": field.optional,
        "tasks": list(field.tasks),
        "requires": field.requires,
        "widget": field.widget,
        "presets": preset_values(field),
    }


def form_fields() -> list[dict[str, Any]]:
    """``GET /v1/fields``: the fields the page's form carries, in the table's order."""
    return [describe(field) for field in FIELDS if field.carried_by("form") and field.widget is not None]


def property_of(field: Field) -> dict[str, Any]:
    """The JSON schema of one field's value in a request."""
    if field.kind == "image":
        return {"type": "string", "description": f"{field.help}: {UPLOAD}"}
    if field.kind == "image_prompts":
        item = {
            "type": "object",
            "properties": {
                "image": {"type": "string", "description": UPLOAD},
                "strength": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": checks.MAX_IMAGE_STRENGTH,
                    "default": 1,
                },
            },
            "required": ["image"],
            "additionalProperties": False,
        }
        return {
            "type": "array",
            "items": item,
            "maxItems": checks.MAX_IMAGE_PROMPTS,
            "description": field.help,
        }
    schema: dict[str, Any] = {"type": _JSON_TYPES.get(field.kind, "string"), "description": field.help}
    if field.choices:
        schema["enum"] = list(field.choices)
    if field.low is not None:
        schema["exclusiveMinimum" if field.open_low else "minimum"] = field.low
    if field.high is not None:
        schema["maximum"] = field.high
    if field.default not in (None, (), "") and not field.derived:
        schema["default"] = field.default
    if field.derived:
        schema["description"] += f" (default: {field.derived})"
    if field.optional or field.tasks or field.requires:
        schema = {"anyOf": [schema, {"type": "null"}], "description": schema["description"]}
    return schema


def request_schema() -> dict[str, Any]:
    """The schema of a ``POST /v1/jobs`` body: the fields the API carries, ``image`` (the input image's
    upload), or ``job`` (a whole job as ``GET /v1/jobs/{id}`` shows it) with its uploads."""
    properties = {field.name: property_of(field) for field in FIELDS if field.carried_by("api")}
    properties["input_image"] = {
        "type": "string",
        "description": "a name for the input image (its upload: image)",
    }
    properties["image"] = {"type": "string", "description": f"the input image: {UPLOAD}"}
    properties["job"] = {"type": "object", "description": "a whole job, as GET /v1/jobs/{id} shows it"}
    return {"type": "object", "properties": properties, "additionalProperties": False}
