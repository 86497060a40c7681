"""The items of a batch run, read from a PROMPTS file: ``.txt``, ``.jsonl`` or ``.csv``.

* ``.txt``: one prompt a line. Blank lines and lines starting with ``#`` are skipped.
* ``.jsonl``: one JSON object a line (blank lines skipped): ``prompt`` and any per-item overrides.
* ``.csv``: a header row with a ``prompt`` column and any override columns; an empty cell is "not given".

Overrides are the job fields a batch file carries (:data:`COLUMNS`: the field table's names, such as
``negative_prompt``, ``seed``, ``width``, ``count`` — images of the item —, ``task``, ``strength``,
``preset``, ``prior_steps`` … ``decoder_rescale``, ``controlnet``, ``control_scale``); image fields
(``input_image``, also ``image``; ``control_image``, ``mask``) are paths relative to the PROMPTS
file's folder; so are image prompts (``image_prompts``, ``negative_image_prompts``): a list of
``FILE[:STRENGTH]`` texts in a JSON line, ``FILE[:STRENGTH]`` texts joined by ``;`` in a CSV cell.
Item ``i`` is the ``i``-th item read (0-based), whatever line it is on. A line that
cannot be read raises a ``ValueError`` naming ``file:line``. Files may start with a UTF-8 BOM (as
spreadsheets write them).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from stable_cascade.fields import ALIASES, BY_NAME, FIELDS, Field

#: Override name → its field (the fields a batch file carries, and their earlier names).
COLUMNS: dict[str, Field] = {
    **{field.name: field for field in FIELDS if field.carried_by("batch") and field.name != "prompt"},
    **{alias: BY_NAME[name] for alias, name in ALIASES.items()},
}
OVERRIDES = tuple(COLUMNS)
SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclasses.dataclass(frozen=True)
class BatchItem:
    """One line of PROMPTS: its prompt and overrides by field name (image fields as absolute paths)."""

    prompt: str
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    where: str = ""  # "file:line", for messages

    def __post_init__(self) -> None:
        where = f"{self.where}: " if self.where else ""
        if not isinstance(self.prompt, str):
            raise ValueError(f"{where}the prompt must be text, got {self.prompt!r}")
        for key, value in self.overrides.items():
            if key not in COLUMNS:
                raise ValueError(
                    f"{where}unknown key {key!r}; expected prompt or one of {', '.join(OVERRIDES)}"
                )
            _check_type(key, value, where)
        named = {COLUMNS[key].name: value for key, value in self.overrides.items()}
        object.__setattr__(self, "overrides", named)  # earlier names → the fields'


def read_items(path: str | Path) -> list[BatchItem]:
    """Every item of the PROMPTS file ``path`` (see the module's docstring), checked line by line."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(
            f"PROMPTS {path} must be a {', '.join(SUFFIXES)} file, got {suffix or 'no suffix'!r}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"PROMPTS file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM, as spreadsheets write it, is dropped
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None
    rows = {".txt": _txt_rows, ".jsonl": _jsonl_rows, ".csv": _csv_rows}[suffix](text, path.name)
    items = [_item(prompt, overrides, f"{path.name}:{line}", path.parent) for line, prompt, overrides in rows]
    if not items:
        raise ValueError(f"PROMPTS {path} has no items; write one prompt a line")
    return items


def _txt_rows(text: str, name: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for line, row in enumerate(text.splitlines(), 1):
        prompt = row.strip()
        if prompt and not prompt.startswith("#"):
            yield line, prompt, {}


def _jsonl_rows(text: str, name: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    for line, row in enumerate(text.splitlines(), 1):
        if not row.strip():
            continue
        try:
            data = json.loads(row)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{name}:{line}: not a JSON object ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{name}:{line}: expected a JSON object with a prompt, got {type(data).__name__}"
            )
        if "prompt" not in data:
            raise ValueError(f'{name}:{line}: the object has no "prompt"')
        prompt = data.pop("prompt")
        yield line, prompt, data


def _csv_rows(text: str, name: str) -> Iterator[tuple[int, str, dict[str, Any]]]:
    reader = csv.DictReader(text.splitlines(), strict=True)
    try:
        header = reader.fieldnames or []
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            raise ValueError(
                f"{name}:1: the CSV header names {', '.join(repeated)} twice; keep one column each"
            )
        if "prompt" not in header:
            raise ValueError(
                f"{name}:1: the CSV header has no prompt column (got {', '.join(header) or 'none'})"
            )
        for row in reader:
            line = reader.line_num
            if None in row or None in row.values():
                raise ValueError(f"{name}:{line}: expected {len(header)} cells as in the header")
            values = {key: _from_cell(key, cell, f"{name}:{line}") for key, cell in row.items() if cell != ""}
            yield line, values.pop("prompt", ""), values
    except csv.Error as error:
        raise ValueError(f"{name}:{reader.line_num}: not valid CSV ({error})") from None


def _from_cell(key: str, cell: str, where: str) -> Any:
    """A CSV cell as its override's type."""
    field = COLUMNS.get(key)
    if field is None or field.kind not in ("int", "float"):
        return cell
    try:
        return field.parse(cell)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def _item(prompt: object, overrides: dict[str, Any], where: str, folder: Path) -> BatchItem:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"{where}: the prompt must be non-empty text, got {prompt!r}")
    overrides = dict(overrides)
    for key, value in overrides.items():
        field = COLUMNS.get(key)
        if field is not None and field.kind == "image_prompts":
            overrides[key] = _image_prompts(key, value, where, folder)
        if field is not None and field.kind == "image" and isinstance(value, str):
            image = folder / value
            if not image.is_file():
                raise ValueError(
                    f"{where}: {key} {image} does not exist (paths are relative to the PROMPTS file)"
                )
            overrides[key] = str(image.resolve())
    return BatchItem(prompt, overrides, where)


def _image_prompts(key: str, value: object, where: str, folder: Path) -> list[tuple[str, float]]:
    """An item's image prompts: ``FILE[:STRENGTH]`` texts (a list, or one text joined by ``;``), each
    file relative to the PROMPTS file, as (absolute path, strength)."""
    texts = value.split(";") if isinstance(value, str) else value
    if not isinstance(texts, list) or not all(isinstance(text, str) for text in texts):
        raise ValueError(f"{where}: {key} must be a list of FILE[:STRENGTH] texts, got {value!r}")
    prompts = []
    for text in (text.strip() for text in texts):
        name, strength = text, "1"
        if not (folder / text).is_file() and ":" in text:
            name, _, strength = text.rpartition(":")
        try:
            number = float(strength)
        except ValueError:
            raise ValueError(
                f"{where}: {key}: expected FILE[:STRENGTH] with a number, got {text!r}"
            ) from None
        if not (folder / name).is_file():
            raise ValueError(
                f"{where}: {key} {folder / name} does not exist (paths are relative to the PROMPTS file)"
            )
        prompts.append((str((folder / name).resolve()), number))
    return prompts


def _check_type(key: str, value: object, where: str) -> None:
    kind = COLUMNS[key].kind
    if kind == "int" and (not isinstance(value, int) or isinstance(value, bool)):
        raise ValueError(f"{where}{key} must be a whole number, got {value!r}")
    if kind == "float" and (
        not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)
    ):
        raise ValueError(f"{where}{key} must be a finite number, got {value!r}")
    if kind == "image_prompts" and not isinstance(value, list):
        raise ValueError(f"{where}{key} must be a list of image prompts, got {value!r}")
    if kind not in ("int", "float", "image_prompts") and not isinstance(value, str):
        raise ValueError(f"{where}{key} must be text, got {value!r}")
