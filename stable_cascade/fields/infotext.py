"""The ``parameters`` text ("infotext") in AUTOMATIC1111's format, written and read from the field table::

    a photo of a cat <lora:ink:0.8>
    Negative prompt: blurry
    Steps: 20, Sampler: DDPM, CFG scale: 4.0, Seed: 42, Size: 1024x1024, Model: full, Preset: reference,
    Shift: 2.0, CFG rescale: 0.7, Stage B steps: 10, Stage B CFG scale: 1.1, Stage B sampler: DDPM, ...

Each field's ``infotext`` label names it (``Size`` is width x height): Stage C's settings under
AUTOMATIC1111's own keys (``Steps``, ``Sampler`` with its sampler names, ``CFG scale``), Stage B's
under keys of their own (``Stage B steps``, …), so AUTOMATIC1111's PNG Info and "Send to txt2img" read
it. LoRAs are written into the prompt as ``<lora:name:weight>``, as AUTOMATIC1111 writes them.

Reading takes AUTOMATIC1111's texts (its numbers are Stage C's; samplers by its names, a scheduler
suffix allowed: "DPM++ 2M Karras") and this package's earlier texts, whose Stage C + Stage B values
shared a key (``Steps: 20+10``, one sampler for both when they agreed, and Stage B's alone for
reconstruct). Labels it does not know are ignored. The reader runs in linear time over text of at
most :data:`MAX_CHARACTERS`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stable_cascade.fields import a1111
from stable_cascade.fields.checks import MAX_PROMPT_CHARACTERS
from stable_cascade.fields.field import Field
from stable_cascade.fields.table import BY_NAME, FIELDS
from stable_cascade.loading.bundles import BUNDLES

#: AUTOMATIC1111's order of the common labels; the others follow in the table's order.
ORDER = ("Steps", "Sampler", "CFG scale", "Seed", "Size", "Model", "Denoising strength")
MAX_CHARACTERS = 2 * MAX_PROMPT_CHARACTERS + 10_000
#: Labels left out at these values (AUTOMATIC1111 writes its Emphasis only when not the default).
OMITTED = {"Task": "txt2img", "Emphasis": "original"}
#: The stage settings: Stage C's label → Stage B's (earlier texts wrote both under Stage C's, "20+10").
STAGE_B_LABELS = {field.infotext: str(BY_NAME[f"decoder{field.name[5:]}"].infotext) for field in FIELDS
                  if field.name.startswith("prior_") and field.infotext}  # fmt: skip
_KEY_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ .-")
_SETTINGS_KEYS = ("Steps:", "Stage B steps:")


def labelled() -> dict[str, list[Field]]:
    """The fields of each label, labels in the text's order."""
    groups: dict[str, list[Field]] = {label: [] for label in ORDER}
    for field in FIELDS:
        if field.infotext is not None:
            groups.setdefault(field.infotext, []).append(field)
    return {label: fields for label, fields in groups.items() if fields}


def model_label(values: Mapping[str, Any]) -> str:
    """A short name for the models: the bundle name, or the names of the prior and decoder files (a
    cascade folder's ``prior`` and ``decoder`` by the folder's name)."""
    bundle = values.get("model")
    stages = [values.get(role) for role in ("prior", "decoder") if role != "prior" or _runs_prior(values)]
    if bundle and not any(stages):
        return str(bundle)
    names = [_stage_name(s) if s else str(bundle or "default") for s in stages]
    return " + ".join(dict.fromkeys(names))


def lora_tags(loras: list[Mapping[str, Any]]) -> str:
    """LoRAs as AUTOMATIC1111 writes them into a prompt: ``<lora:name:weight>``, by file name."""
    return " ".join(f"<lora:{Path(str(lora['path'])).stem}:{float(lora['scale']):g}>" for lora in loras)


def write(values: Mapping[str, Any], seed: int, version: str) -> str:
    """The text of one image of the job ``values`` (a job's fields by name), made with ``seed``."""
    parts: dict[str, object] = {}
    for label, fields in labelled().items():
        given = [(field, values[field.name]) for field in fields if values.get(field.name) is not None]
        if not given or OMITTED.get(label, object()) == given[0][1]:
            continue
        parts[label] = _written(label, given, values, seed)
    parts["Version"] = f"stable-cascade {version}"
    prompt = str(values.get("prompt", ""))
    if values.get("loras"):
        prompt = f"{prompt} {lora_tags(values['loras'])}".strip()
    lines = [prompt]
    if values.get("negative_prompt"):
        lines.append(f"Negative prompt: {values['negative_prompt']}")
    lines.append(", ".join(f"{label}: {_quoted(text)}" for label, text in parts.items()))
    return "\n".join(lines)


def _written(label: str, given: list[tuple[Field, Any]], values: Mapping[str, Any], seed: int) -> object:
    field, value = given[0]
    if label == "Seed":
        return seed
    if label == "Size":
        return "x".join(str(value) for _, value in given)
    if label == "Model":
        return model_label(values)
    if label == "ControlNet":
        return Path(str(value)).stem
    if field.kind == "choice" and field.choice_names:
        return field.name_of(value)  # AUTOMATIC1111's name: "Euler a"
    return value


def parse(text: str, source: str = "the parameters text") -> dict[str, Any]:
    """The fields an infotext gives (by name; ``seed`` is the image's), and ``prompt`` and
    ``negative_prompt``; a one-line ``ValueError`` when it has no settings line or is too long."""
    if len(text) > MAX_CHARACTERS:
        raise ValueError(f"{source} has {len(text):,} characters; at most {MAX_CHARACTERS:,} are read")
    lines = text.strip().split("\n")
    settings_at = max(
        (i for i, line in enumerate(lines) if any(key in line for key in _SETTINGS_KEYS)), default=None
    )
    if settings_at is None:
        raise ValueError(f"{source}: no 'Steps:' line in its parameters text")
    prompt_lines, negative_lines = lines[:settings_at], []
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            prompt_lines, negative_lines = prompt_lines[:i], prompt_lines[i:]
            break
    negative = "\n".join(negative_lines).removeprefix("Negative prompt:").strip()
    values: dict[str, Any] = {"prompt": "\n".join(prompt_lines).strip(), "negative_prompt": negative}
    pairs = _stage_pairs(dict(_pairs(lines[settings_at])), values)
    if "Task" in pairs:
        values["task"] = BY_NAME["task"].parse(pairs["Task"])
    for label, fields in labelled().items():
        if label in pairs and label != "Task":
            values.update(_read(label, pairs[label], fields, values))
    return values


def _stage_pairs(pairs: dict[str, str], values: dict[str, Any]) -> dict[str, str]:
    """``pairs`` with this package's earlier stage keys split: ``Steps: 20+10`` → ``Steps: 20`` and
    ``Stage B steps: 10``; one sampler for both stages; reconstruct's Stage B values under Stage C's
    keys. Such texts encoded prompts as written (``Emphasis: None``)."""
    earlier = "+" in pairs.get("Steps", "")  # sampler names hold "+" too: "DPM++ 2M"
    reconstruct = pairs.get("Task", "").strip() == "reconstruct"
    if not earlier and not (reconstruct and not any(b in pairs for b in STAGE_B_LABELS.values())):
        return pairs
    values["emphasis"] = "none"
    split = dict(pairs)
    for label, stage_b in STAGE_B_LABELS.items():
        if label not in pairs or stage_b in pairs:
            continue
        first, plus, second = pairs[label].partition("+")
        if reconstruct:
            split[stage_b] = split.pop(label)
        elif plus:
            split[label], split[stage_b] = first, second
        elif label == "Sampler":
            split[stage_b] = first  # one sampler: both stages'
    return split


def _read(label: str, text: str, fields: list[Field], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values of one label's fields (those the text can carry)."""
    if label == "Model":
        return {"model": text} if text in BUNDLES else {}
    if label == "Size":
        width, _, height = text.lower().partition("x")
        return {"width": BY_NAME["width"].parse(width), "height": BY_NAME["height"].parse(height)}
    field = fields[0]
    if not field.carried_by("infotext") or not field.applies(values.get("task", "txt2img"), {}):
        return {}
    if field.name.endswith("_sampler"):
        return {field.name: a1111.sampler(text.strip(), field.label)}
    return {field.name: field.parse(text)}


def _stage_name(path: str) -> str:
    name = Path(path).name
    return Path(path).parent.name if name in ("prior", "decoder") and Path(path).parent.name else name


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


def parameters(text: str, source: str = "the parameters text") -> dict[str, str]:
    """An infotext as AUTOMATIC1111's PNG Info reads it (its ``parse_generation_parameters`` keys):
    ``Prompt``, ``Negative prompt`` and each key of the settings line as written, ``Size`` also as
    ``Size-1`` and ``Size-2``."""
    if len(text) > MAX_CHARACTERS:
        raise ValueError(f"{source} has {len(text):,} characters; at most {MAX_CHARACTERS:,} are read")
    lines = text.strip().split("\n")
    settings = lines.pop() if lines and any(key in lines[-1] for key in _SETTINGS_KEYS) else ""
    negative_at = next((i for i, line in enumerate(lines) if line.startswith("Negative prompt:")), len(lines))
    found = {
        "Prompt": "\n".join(lines[:negative_at]).strip(),
        "Negative prompt": "\n".join(lines[negative_at:]).removeprefix("Negative prompt:").strip(),
    }
    for key, value in _pairs(settings):
        found[key] = value
        if key == "Size":
            found["Size-1"], _, found["Size-2"] = value.lower().partition("x")
    return found
