"""The ControlNet options of ``generate``, ``img2img`` and ``variation`` (``--controlnet NAME|FILE
--control-image IMG [--mask MASK] [--control-scale S] [--control-type TYPE]``, from the field table)
with a rerun's recorded control: the job's control fields."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_cascade.fields import CONTROL_TYPES

if TYPE_CHECKING:  # the library loads when a command runs, not to parse arguments
    from stable_cascade.engine import ControlRef, Job

#: The control fields the command line takes; the rest (sha256s) are derived from the files.
FIELDS = ("controlnet", "control_image", "mask", "control_scale", "control_type")
_NAMES = "|".join(CONTROL_TYPES)


def from_flags(args: argparse.Namespace, recorded: Job | None) -> dict[str, Any]:
    """The run's control fields: the recorded control (``--from-png``) with the given flags, or the
    flags' own."""
    given = {name: value for name in FIELDS if (value := getattr(args, name, None)) is not None}
    old = recorded.controls[0] if recorded is not None and recorded.controls else None
    if old is None or not hasattr(args, "controlnet"):  # reconstruct takes no control
        if given and "controlnet" not in given:
            flags = "--control-image, --mask, --control-scale and --control-type"
            raise ValueError(f"{flags} go with --controlnet {_NAMES}|FILE; add it")
        if given and "control_image" not in given:
            raise ValueError("--controlnet needs --control-image IMG (the image that steers the result)")
        return given
    for name, what, flag in (
        ("control_image", "control image", "--control-image IMG"),
        ("mask", "mask", "--mask MASK"),
    ):
        path = getattr(old, "image" if name == "control_image" else name)
        if path is not None and name not in given and not Path(path).is_file():
            raise ValueError(
                f"the {what} {path} recorded in {args.from_png} does not exist; put it back, or pass {flag}"
            )
    merged = {
        "controlnet": old.controlnet,
        "control_image": old.image,
        "mask": old.mask,
        "control_scale": old.scale,
        "control_type": old.control_type,
        **given,
    }
    if "controlnet" in given and "control_type" not in given:  # another ControlNet: its own type
        merged["control_type"] = None
    return merged


def compare(recorded: tuple[ControlRef, ...], made: tuple[ControlRef, ...], png: str | None) -> None:
    """Warn where a recorded control file (the same path) differs from the one recorded."""
    for old, new in zip(recorded, made, strict=False):
        for what, field in (("control image", "image"), ("mask", "mask"), ("ControlNet", "controlnet")):
            before, after = getattr(old, f"{field}_sha256"), getattr(new, f"{field}_sha256")
            same_file = getattr(old, field) == getattr(new, field)
            if same_file and before is not None and after is not None and before != after:
                print(f"warning: the {what} differs from the one recorded in {png}", file=sys.stderr)
