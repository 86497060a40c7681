"""The ControlNet flags of ``generate``, ``img2img`` and ``variation``: ``--controlnet NAME|FILE
--control-image IMG [--mask MASK] [--control-scale S] [--control-type TYPE]`` → the job's control."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_cascade.cli.choices import CONTROL_TYPES

if TYPE_CHECKING:  # the library loads when a command runs, not to parse arguments
    from stable_cascade.engine import ControlRef

#: Flag destination → ControlRef field.
FLAGS = {
    "controlnet": "controlnet",
    "control_image": "image",
    "mask": "mask",
    "control_scale": "scale",
    "control_type": "control_type",
}
_NAMES = "|".join(CONTROL_TYPES)


def add_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ControlNet (steers Stage C)")
    group.add_argument(
        "--controlnet",
        metavar=f"{_NAMES}|FILE",
        help="a released ControlNet of the model (--model full: Stability's files; --model demo: canny), "
        "or a ControlNet file or model folder",
    )
    group.add_argument(
        "--control-image", metavar="IMG", help="the control image (super_resolution: the small image)"
    )
    group.add_argument("--mask", metavar="MASK", help="inpainting: white where new content is generated")
    group.add_argument(
        "--control-scale", type=float, metavar="S", help="the ControlNet's strength, 0-10 (1.0)"
    )
    group.add_argument(
        "--control-type",
        choices=CONTROL_TYPES,
        help="the control a ControlNet file takes (when it cannot tell)",
    )


def from_flags(args: argparse.Namespace, recorded: tuple[ControlRef, ...]) -> list[ControlRef]:
    """The run's control: the recorded one (``--from-png``) with the given flags, or the flags' own."""
    from stable_cascade.engine import ControlRef

    given = {
        field: value for flag, field in FLAGS.items() if (value := getattr(args, flag, None)) is not None
    }
    if not recorded:
        if given and "controlnet" not in given:
            raise ValueError(
                "--control-image, --mask, --control-scale and --control-type go with --controlnet "
                f"{_NAMES}|FILE; add it"
            )
        if given and "image" not in given:
            raise ValueError("--controlnet needs --control-image IMG (the image that steers the result)")
        return [ControlRef(**given)] if given else []
    old = recorded[0]
    for field, what, flag in (
        ("image", "control image", "--control-image IMG"),
        ("mask", "mask", "--mask MASK"),
    ):
        path = getattr(old, field)
        if path is not None and field not in given and not Path(path).is_file():
            raise ValueError(
                f"the {what} {path} recorded in {args.from_png} does not exist; put it back, or pass {flag}"
            )
    changes: dict[str, Any] = dict(given)
    if "controlnet" in given:  # another ControlNet: its own control type unless one is given
        changes.setdefault("control_type", None)
    return [dataclasses.replace(old, **changes)]


def compare(recorded: tuple[ControlRef, ...], made: tuple[ControlRef, ...], png: str | None) -> None:
    """Warn where a recorded control file (the same path) differs from the one recorded."""
    for old, new in zip(recorded, made, strict=False):
        for what, field in (("control image", "image"), ("mask", "mask"), ("ControlNet", "controlnet")):
            before, after = getattr(old, f"{field}_sha256"), getattr(new, f"{field}_sha256")
            same_file = getattr(old, field) == getattr(new, field)
            if same_file and before is not None and after is not None and before != after:
                print(f"warning: the {what} differs from the one recorded in {png}", file=sys.stderr)
