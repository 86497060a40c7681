"""The one JSON reader: every config, index, state or record file the package reads goes through it.

Errors name the file and what is wrong in one line: a syntax error, text that is not UTF-8, nesting
too deep for the parser (``[[[[…`` would otherwise surface as a ``RecursionError``), or a value of the
wrong kind.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from stable_cascade.checkpoint.errors import CheckpointError


def parse_json(text: str, source: str) -> Any:
    """The JSON value in ``text``; ``source`` (a file name, ``"data.jsonl:3"``) names it in errors."""
    try:
        return json.loads(text)
    except RecursionError:
        raise CheckpointError(
            f"{source} is nested too deeply to be a valid JSON file; check that it is the right file"
        ) from None
    except ValueError as error:  # json.JSONDecodeError, and integers too long to convert
        raise CheckpointError(f"{source} is not valid JSON: {error}") from error


def read_json(path: str | Path) -> Any:
    """The JSON value in the UTF-8 file ``path``, or a ``CheckpointError`` naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise CheckpointError(f"{path} is not a UTF-8 text file: {error}") from error
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a JSON file") from None
    return parse_json(text, str(path))


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in ``path`` (a config, index or state file), or a ``CheckpointError`` naming it."""
    data = read_json(path)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object ({{...}}), got a {type(data).__name__}")
    return data
