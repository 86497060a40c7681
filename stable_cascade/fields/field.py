"""One job field, declared once: its type, default, bounds, help and how each front end carries it.

A :class:`Field` is data. The command line builds its options from it, the AUTOMATIC1111 routes map
their names with it, the native API's schema and the web page's form come from it, batch files take
its name as a column, and the PNG record and the infotext write and read it. :meth:`Field.check` is
the one validation of a value, with the one error text every front end shows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal

from stable_cascade.fields import checks
from stable_cascade.limits import MAX_SEED

#: ``text`` (a prompt), ``int``, ``float``, ``choice`` (one of ``choices``), ``name`` (a model name or a
#: file; the server takes names only), ``image`` (a picture: a path on the command line and in batch
#: files, an upload in the APIs and the page), ``sha256`` (derived from a file), ``loras`` and
#: ``ip_adapters`` (lists of LoRA / IP-Adapter files with scales), ``image_prompts`` (a list of
#: pictures with strengths: paths or uploads, as ``image``).
Kind = Literal[
    "text", "int", "float", "choice", "name", "image", "sha256", "loras", "ip_adapters", "image_prompts"
]
#: The kinds whose value is a list (empty, not None, where the field does not apply).
LIST_KINDS = ("loras", "ip_adapters", "image_prompts")
#: Where a field comes from or goes: the command line, the AUTOMATIC1111 routes, the native jobs API,
#: batch files, the web page's form, the PNG's JSON record and its infotext.
FrontEnd = Literal["cli", "a1111", "api", "batch", "form", "record", "infotext"]
FRONT_ENDS: tuple[FrontEnd, ...] = ("cli", "a1111", "api", "batch", "form", "record", "infotext")
Widget = Literal["text", "textarea", "number", "select", "image", "loras", "image_prompts"]


@dataclasses.dataclass(frozen=True)
class Field:
    """A job field (see the module's docstring).

    ``default`` is the value of a job built directly (``Job()``); ``derived`` says how
    :meth:`Job.create <stable_cascade.engine.Job.create>` fills it when it is not given (from the
    preset, the model, the input image, …). A field whose ``tasks`` exclude a job's task, or whose
    ``requires`` field is unset, holds None. ``cli`` lists option strings (a name without dashes is a
    positional argument); ``a1111`` is AUTOMATIC1111's name for it (every field is also accepted by
    its own name, at the top level or in ``override_settings``); ``infotext`` its label in the
    parameters text. ``why_not`` says, per front end, why it does not carry the field, or how it
    carries it instead.
    """

    name: str
    kind: Kind
    label: str  # in messages and on the page: "Stage C steps"
    help: str
    group: str
    default: Any = None
    derived: str = ""
    low: float | None = None
    high: float | None = None
    open_low: bool = False
    choices: tuple[str, ...] = ()
    #: Other names of choices (AUTOMATIC1111's "Euler a"): name → choice; matched case-insensitively.
    choice_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    optional: bool = False  # None is a valid value where the field applies
    tasks: tuple[str, ...] = ()  # the tasks it applies to; () for all
    requires: str | None = None
    cli: tuple[str, ...] = ()
    a1111: str | None = None
    infotext: str | None = None
    widget: Widget | None = None
    aliases: tuple[str, ...] = ()  # earlier names, still accepted by the API and batch files
    why_not: Mapping[FrontEnd, str] = dataclasses.field(default_factory=dict)

    @property
    def empty(self) -> Any:
        """The value where the field does not apply: None (no LoRAs, image prompts: an empty tuple)."""
        return () if self.kind in LIST_KINDS else None

    def carried_by(self, front_end: FrontEnd) -> bool:
        return front_end not in self.why_not

    def applies(self, task: str, values: Mapping[str, Any]) -> bool:
        """Whether the field has a value in a job of ``task`` with these (other) values."""
        if self.tasks and task not in self.tasks:
            return False
        return self.requires is None or values.get(self.requires) is not None

    def not_applying(self, task: str) -> str:
        """The error for a value given where the field does not apply."""
        if task == "reconstruct" and "txt2img" in self.tasks:
            return f"{self.label} applies to Stage C, which reconstruct does not run"
        if self.tasks and task not in self.tasks:
            return f"{self.label} applies to {' and '.join(self.tasks)} only, not to {task}"
        return f"{self.label} goes with {self.requires}; set that too, or leave {self.name} out"

    def check(self, value: Any, task: str = "") -> Any:
        """``value`` checked against the field's type and bounds (numbers as int/float): the one
        validation; a one-line ``ValueError`` says what was expected (for a job of ``task``)."""
        if value is None:
            if self.optional:
                return None
            needs = f"{task} needs the {self.label}" if task else f"{self.label} is missing"
            raise ValueError(f"{needs} ({self.help})")
        if self.kind == "int":
            return checks.check_int(self.label, value, int(self.low or 0), int(self.high or MAX_SEED))
        if self.kind == "float":
            low = -math.inf if self.low is None else self.low
            high = math.inf if self.high is None else self.high
            return checks.check_float(self.label, value, low, high, open_low=self.open_low)
        if self.kind == "choice":
            return checks.check_choice(self.label, value, self.choices)
        if self.kind == "text":
            return checks.check_text(self.label, value)
        if self.kind in ("name", "image", "sha256"):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{self.label} must be {_WANTED[self.kind]}, got {value!r}")
            return value
        if self.kind == "image_prompts" and len(value) > checks.MAX_IMAGE_PROMPTS:
            raise ValueError(f"{self.label}: at most {checks.MAX_IMAGE_PROMPTS} images, got {len(value)}")
        return value  # lists: each item checked by the engine's references (LoraRef, ImagePromptRef)

    def choice(self, given: object, what: str | None = None) -> str:
        """A choice from its value or one of its other names (case-insensitive), as front ends take it;
        ``what`` names it in the error (default: the label)."""
        if isinstance(given, str):
            lowered = given.strip().lower()
            for name, value in self.choice_names.items():
                if lowered == name.lower():
                    return value
            for value in self.choices:
                if lowered == value.lower():
                    return value
        if not self.choice_names:
            return checks.check_choice(what or self.label, given, self.choices)
        order = dict.fromkeys([*self.choice_names.values(), *self.choices])
        named = ", ".join(f"{self.name_of(value)} ({value})" for value in order)
        raise ValueError(f"unknown {what or self.label} {given!r}; expected one of {named}")

    def name_of(self, value: str) -> str:
        """The display name of a choice (its first other name), else the choice itself."""
        return next((name for name, choice in self.choice_names.items() if choice == value), value)

    def parse(self, text: str) -> Any:
        """A value from text (a command-line argument, a CSV cell, an infotext value)."""
        text = text.strip()
        try:
            if self.kind == "int":
                return int(text)
            if self.kind == "float":
                return float(text)
        except ValueError:
            raise ValueError(f"{self.label} must be {_WANTED[self.kind]}, got {text!r}") from None
        if self.kind == "choice":
            return self.choice(text)
        return text


_WANTED = {
    "int": "a whole number",
    "float": "a number",
    "name": "a name or a file path",
    "image": "an image",
    "sha256": "a sha256 digest",
}
