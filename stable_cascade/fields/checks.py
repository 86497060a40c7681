"""The limits a job's values must respect, each check raising one ``ValueError`` line that says what was
expected and how to fix it (the CLI shows it as is; the server answers it with a 422)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from stable_cascade.limits import MAX_PIXELS, MAX_SIDE, SIZE_MULTIPLE

DEFAULT_SIZE = 1024  # pixels per side, when neither the model nor the request says
#: The smallest side any cascade makes: Stage B needs one latent pixel at its deepest level (Stage A's
#: 4× · patch 2 · 2^(levels - 1)): 32 for the demo's three levels, 64 for the released four.
MIN_SIDE = 32
MAX_BATCH_SIZE = 64
MAX_COUNT = 100_000
MAX_PROMPT_CHARACTERS = 100_000
MAX_CONTROL_SCALE = 10.0  # ComfyUI's strength limit for ControlNets
MAX_IMAGE_STRENGTH = 10.0  # an image prompt's strength: a multiple of its CLIP embedding
MAX_IMAGE_PROMPTS = 16  # image prompts of one job (each is 4 more Stage C tokens)


def check_int(name: str, value: object, low: int, high: int, hint: str = "") -> int:
    """``value`` as an int in ``[low, high]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}{hint}")
    return value


def check_float(
    name: str, value: object, low: float, high: float = math.inf, open_low: bool = False
) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number, got {value!r}")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if number < low or (open_low and number == low) or number > high:
        bracket = "(" if open_low else "["
        upper = "" if high == math.inf else f"{high:g}"
        raise ValueError(f"{name} must be in {bracket}{low:g}, {upper or '∞'}], got {value!r}")
    return number


def check_size(width: object, height: object) -> tuple[int, int]:
    """An output size: multiples of 8, at least 32 and at most 8192 per side, at most 4096² pixels."""
    for name, value in (("width", width), ("height", height)):
        check_int(name, value, 1, MAX_SIDE, f" (at most {MAX_SIDE} pixels per side)")
        assert isinstance(value, int)
        if value % SIZE_MULTIPLE:
            nearest = max(MIN_SIDE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)
            raise ValueError(
                f"{name} must be a multiple of {SIZE_MULTIPLE} pixels, got {value}; try {nearest}"
            )
        if value < MIN_SIDE:
            raise ValueError(
                f"{name} must be at least {MIN_SIDE} pixels, got {value} (Stage B needs one latent pixel at "
                f"its deepest level; the released models need 64); try {MIN_SIDE} or more"
            )
    assert isinstance(width, int) and isinstance(height, int)
    if width * height > MAX_PIXELS:
        raise ValueError(
            f"{width}x{height} is {width * height:,} pixels, more than the limit of {MAX_PIXELS:,} "
            "(4096x4096); make the image smaller"
        )
    return width, height


def check_text(name: str, value: object) -> str:
    """A prompt: a string that is valid Unicode (no lone surrogates, as undecodable argv bytes give)."""
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(
            f"the {name} is not valid UTF-8 text (character {error.start} cannot be encoded); "
            "pass it as UTF-8 (check the terminal's or file's encoding)"
        ) from None
    if len(value) > MAX_PROMPT_CHARACTERS:
        raise ValueError(f"the {name} has {len(value):,} characters; at most {MAX_PROMPT_CHARACTERS:,}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...] | Mapping[str, Any]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(choices)}")
    return value
