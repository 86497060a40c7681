"""The AUTOMATIC1111-style ``parameters`` text ("infotext"), written and read from the field table::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20+10, Sampler: ddpm, CFG scale: 4.0+1.1, Seed: 42, Size: 1024x1024, Model: full, ...

Each field's ``infotext`` label names it; fields that share a label are one value, joined by ``+``
(Stage C + Stage B) or, for ``Size``, by ``x``; equal choices are written once. Reading takes a single
number of a ``+`` pair as Stage C's (AUTOMATIC1111's own texts: Stage B keeps the preset's), a single
choice as both stages', choices also by AUTOMATIC1111's names ("Euler a"), and ignores labels it does
not know. The reader runs in linear time over text of at most :data:`MAX_CHARACTERS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stable_cascade.fields.checks import MAX_PROMPT_CHARACTERS
from stable_cascade.fields.field import Field
from stable_cascade.fields.table import BY_NAME, FIELDS
from stable_cascade.loading.bundles import BUNDLES

#: AUTOMATIC1111's order of the common labels; the others follow in the table's order.
ORDER = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Preset", "Shift", "CFG rescale")
MAX_CHARACTERS = 2 * MAX_PROMPT_CHARACTERS + 10_000
_KEY_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ .-")


def labelled() -> dict[str, list[Field]]:
    """The fields of each label, labels in the text's order."""
    groups: dict[str, list[Field]] = {label: [] for label in ORDER}
    for field in FIELDS:
        if field.infotext is not None:
            groups.setdefault(field.infotext, []).append(field)
    return {label: fields for label, fields in groups.items() if fields}


def model_label(values: Mapping[str, Any]) -> str:
    """A short name for the models: the bundle name, or the last parts of the prior and decoder."""
    bundle = values.get("model")
    stages = [values.get(role) for role in ("prior", "decoder") if role != "prior" or _runs_prior(values)]
    if bundle and not any(stages):
        return str(bundle)
    return " + ".join(Path(s).name if s else str(bundle or "default") for s in stages)


def write(values: Mapping[str, Any], seed: int, version: str) -> str:
    """The text of one image of the job ``values`` (a job's fields by name), made with ``seed``."""
    parts: dict[str, object] = {}
    for label, fields in labelled().items():
        given = [(field, values[field.name]) for field in fields if values.get(field.name) is not None]
        if not given or (label == "Task" and values.get("task") == "txt2img"):
            continue
        parts[label] = _written(label, given, values, seed)
    if values.get("loras"):
        parts["Lora"] = "+".join(f"{Path(lora['path']).stem}:{lora['scale']:g}" for lora in values["loras"])
    parts["Version"] = f"stable-cascade {version}"
    lines = [str(values.get("prompt", ""))]
    if values.get("negative_prompt"):
        lines.append(f"Negative prompt: {values['negative_prompt']}")
    lines.append(", ".join(f"{label}: {_quoted(text)}" for label, text in parts.items()))
    return "\n".join(lines)


def _written(label: str, given: list[tuple[Field, Any]], values: Mapping[str, Any], seed: int) -> object:
    if label == "Seed":
        return seed
    if label == "Size":
        return "x".join(str(value) for _, value in given)
    if label == "Model":
        return model_label(values)
    if label == "ControlNet":
        return Path(str(given[0][1])).stem
    texts = [str(value) for _, value in given]
    if given[0][0].kind == "choice":
        texts = list(dict.fromkeys(texts))  # one name when the stages agree
    return "+".join(texts)


def parse(text: str, source: str = "the parameters text") -> dict[str, Any]:
    """The fields an infotext gives (by name; ``seed`` is the image's), and ``prompt`` and
    ``negative_prompt``; a one-line ``ValueError`` when it has no settings line or is too long."""
    if len(text) > MAX_CHARACTERS:
        raise ValueError(f"{source} has {len(text):,} characters; at most {MAX_CHARACTERS:,} are read")
    lines = text.strip().split("\n")
    settings_at = max((i for i, line in enumerate(lines) if "Steps:" in line), default=None)
    if settings_at is None:
        raise ValueError(f"{source}: no 'Steps:' line in its parameters text")
    prompt_lines, negative_lines = lines[:settings_at], []
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            prompt_lines, negative_lines = prompt_lines[:i], prompt_lines[i:]
            break
    negative = "\n".join(negative_lines).removeprefix("Negative prompt:").strip()
    values: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": negative}
    pairs = dict(_pairs(lines[settings_at]))
    groups = labelled()
    if "Task" in pairs:
        values["task"] = BY_NAME["task"].parse(pairs["Task"])
    for label, fields in groups.items():
        if label in pairs and label != "Task":
            values.update(_read(label, pairs[label], fields, values))
    return values


def _read(label: str, text: str, fields: list[Field], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of one label's fields (those the text can carry)."""
    if label == "Model":
        return {"model": text} if text in BUNDLES else {}
    if label == "Size":
        width, _, height = text.lower().partition("x")
        return {"width": BY_NAME["width"].parse(width), "height": BY_NAME["height"].parse(height)}
    fields = [f for f in fields if f.carried_by("infotext") and f.applies(values.get("task", "txt2img"), {})]
    items = text.split("+") if len(fields) > 1 else [text]
    if len(items) == 1 and len(fields) > 1 and fields[0].kind != "choice":
        fields = fields[:1]  # one number: Stage C's (AUTOMATIC1111's texts); Stage B keeps the preset's
    if len(items) == 1:
        items = items * len(fields)
    return {field.name: field.parse(item) for field, item in zip(fields, items, strict=False)}


def _pairs(line: str) -> Iterator[tuple[str, str]]:
    """``key: value`` pairs of a settings line, in one pass (values may be JSON strings with commas)."""
    i, end = 0, len(line)
    while i < end:
        colon = line.find(":", i)
        if colon < 0:
            return
        key = line[i:colon].strip()
        j = colon + 1
        while j < end and line[j] == " ":
            j += 1
        if j < end and line[j] == '"':
            value, j = _json_string(line, j)
        else:
            comma = line.find(",", j)
            comma = end if comma < 0 else comma
            value, j = line[j:comma].strip(), comma
        if key and all(c in _KEY_CHARACTERS for c in key):
            yield key, value
        comma = line.find(",", j)
        i = end if comma < 0 else comma + 1


def _json_string(line: str, start: int) -> tuple[str, int]:
    """The quoted value starting at ``start`` and where it ends (an unclosed quote runs to the end)."""
    j = start + 1
    while j < len(line) and line[j] != '"':
        j += 2 if line[j] == "\\" else 1
    raw = line[start : j + 1]
    try:
        return str(json.loads(raw)), j + 1
    except json.JSONDecodeError:
        return raw.strip('"'), j + 1


def _quoted(value: object) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def _runs_prior(values: Mapping[str, Any]) -> bool:
    return values.get("task") != "reconstruct"
