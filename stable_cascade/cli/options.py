"""The command line's job options, built from the field table: one option per field that has ``cli``
option strings, grouped as the table groups them, ``dest`` the field's name, every default None ("not
given": the value then comes from ``--from-png`` or the job's derivation).

Light: the field table imports no torch, so ``--help`` and argument errors answer at once.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from stable_cascade.fields import BY_NAME, FIELDS, Field

#: Positional arguments, in the order the command line takes them.
POSITIONALS = ("input_image", "prompt")


def add_field_options(
    parser: argparse.ArgumentParser,
    task: str | None,
    *,
    skip: Collection[str] = (),
    helps: dict[str, str] | None = None,
) -> None:
    """An option for every field with option strings that applies to ``task`` (None: any task), but
    ``skip``; ``helps`` replaces a field's help."""
    helps = helps or {}
    fields = [
        f for f in FIELDS if f.cli and f.name not in skip and (task is None or not f.tasks or task in f.tasks)
    ]
    for name in POSITIONALS:
        for field in fields:
            if field.name == name and not field.cli[0].startswith("-"):
                nargs = "?" if name == "prompt" else None
                parser.add_argument(
                    field.name, metavar=field.cli[0], nargs=nargs, help=helps.get(name, field.help)
                )
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in fields:
        if not field.cli[0].startswith("-"):
            continue
        group = groups.get(field.group) or groups.setdefault(
            field.group, parser.add_argument_group(field.group)
        )
        group.add_argument(*field.cli, dest=field.name, **_argument(field, helps.get(field.name)))


def _argument(field: Field, help: str | None) -> dict[str, Any]:
    text = help or field.help
    default = field.derived or ("" if field.default in (None, (), "") else str(field.default))
    if default and help is None:
        text += f" (default: {default})"
    arguments: dict[str, Any] = {"help": text}
    if field.kind in SPECS:
        arguments.update(action="append", type=SPECS[field.kind], metavar=SPECS[field.kind].__doc__)
    elif field.kind == "choice" and field.name != "model":  # the job names an unknown model (and lists them)
        arguments.update(choice(field))
    elif field.kind in ("int", "float"):
        arguments.update(type=typed(field, field.parse), metavar=field.name.split("_")[-1].upper())
    return arguments


def typed(field: Field, parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its errors as argparse's (one line, naming the option)."""

    def typed(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    typed.__name__ = field.name
    return typed


def choice(field: Field) -> dict[str, Any]:
    """argparse's ``type`` and ``metavar`` of a choice field: checked by the field itself (the job's
    message), the choices listed in the help."""
    return {"type": typed(field, field.check), "metavar": "{" + ",".join(field.choices) + "}"}


def add_sampler_option(parser: argparse.ArgumentParser) -> None:
    """``--sampler``: the sampler of both stages, a shorthand the explicit stage options override."""
    parser.add_argument(
        "--sampler",
        **choice(BY_NAME["prior_sampler"]),
        help="the sampler of both stages (--prior-sampler and --decoder-sampler override it)",
    )


def given_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The field values given on the command line (options left out are not given)."""
    given = {f.name: value for f in FIELDS if f.cli and (value := getattr(args, f.name, None)) is not None}
    if getattr(args, "sampler", None) is not None:
        for stage in ("prior", "decoder"):
            if hasattr(args, f"{stage}_sampler"):
                given.setdefault(f"{stage}_sampler", args.sampler)
    return given


def file_with_number(text: str, what: str, number: str = "SCALE") -> tuple[Path, float]:
    """``FILE`` or ``FILE:NUMBER`` (a file whose name holds a colon may be given whole) → (path, number),
    the file existing (``what`` names it) and the number finite."""
    path, scale = text, "1"
    if not Path(text).is_file() and ":" in text:
        path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FILE or FILE:{number} with a number {number}, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the {number.lower()} of {text!r} must be a finite number")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"{what} {path} does not exist")
    return Path(path), value


def lora_spec(text: str) -> tuple[Path, float]:
    """FILE[:SCALE]"""
    return file_with_number(text, "LoRA file")


def ip_adapter_spec(text: str) -> tuple[Path, float]:
    """FILE[:SCALE]"""
    return file_with_number(text, "IP-Adapter file")


def image_prompt_spec(text: str) -> tuple[Path, float]:
    """FILE[:STRENGTH]"""
    path, strength = file_with_number(text, "image", "STRENGTH")
    if strength < 0:
        raise argparse.ArgumentTypeError(
            f"the strength of {text!r} must be >= 0 (0 leaves the image out); use --negative-image-prompt "
            "to steer away from an image"
        )
    return path, strength


#: The command-line type of each list kind's items (its docstring: the metavar).
SPECS: dict[str, Callable[[str], tuple[Path, float]]] = {
    "loras": lora_spec,
    "ip_adapters": ip_adapter_spec,
    "image_prompts": image_prompt_spec,
}
