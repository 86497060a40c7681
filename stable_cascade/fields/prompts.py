"""AUTOMATIC1111's extra networks in a prompt: ``<lora:name:weight>`` (and ``<lyco:…>``, its older name
for the same), found and removed as its ``extra_networks.parse_prompt`` does (``<(\\w+):([^>]+)>``),
in one linear pass."""

from __future__ import annotations

import dataclasses
import math

#: The extra-network kinds that are LoRAs.
LORA_KINDS = ("lora", "lyco")


@dataclasses.dataclass(frozen=True)
class PromptLora:
    """A ``<lora:name:weight>`` of a prompt."""

    name: str
    scale: float = 1.0


def extra_networks(prompt: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """The prompt without its ``<kind:arg:arg…>`` tags, and each tag's kind and arguments, in order."""
    kept: list[str] = []
    found: list[tuple[str, list[str]]] = []
    start = at = 0
    close = -1
    while (at := prompt.find("<", at)) >= 0:
        if close < at and (close := prompt.find(">", at)) < 0:
            break  # no tag closes after here
        kind, colon, arguments = prompt[at + 1 : close].partition(":")
        if colon and arguments and kind and all(c.isalnum() or c == "_" for c in kind):
            kept.append(prompt[start:at])
            found.append((kind, arguments.split(":")))
            start = at = close + 1
        else:
            at += 1
    kept.append(prompt[start:])
    return "".join(kept), found


def prompt_loras(prompt: str) -> tuple[str, list[PromptLora]]:
    """The prompt without its tags (ends stripped), and its ``<lora:name:weight>`` in order; a one-line
    ``ValueError`` for another kind of extra network, or a weight that is not a number. A second weight
    (AUTOMATIC1111's UNet weight) must equal the first: one weight serves both parts of a LoRA here."""
    text, networks = extra_networks(prompt)
    loras = []
    for kind, arguments in networks:
        if kind.lower() not in LORA_KINDS:
            raise ValueError(
                f"<{kind}:{':'.join(arguments)}> in the prompt: only LoRAs (<lora:name:weight>) are "
                "supported; remove it"
            )
        name, weights = arguments[0].strip(), [_weight(w, arguments[0]) for w in arguments[1:3]]
        if not name:
            raise ValueError("a <lora:…> in the prompt has no name; write <lora:name:weight>")
        if len(weights) == 2 and weights[0] != weights[1]:
            raise ValueError(
                f"<lora:{name}:…> gives two weights ({weights[0]:g}, {weights[1]:g}); one weight serves the "
                "whole LoRA here: give one"
            )
        loras.append(PromptLora(name, weights[0] if weights else 1.0))
    return text.strip(), loras


def _weight(text: str, name: str) -> float:
    try:
        weight = float(text.strip().removeprefix("te=").removeprefix("unet="))
    except ValueError:
        raise ValueError(f"the weight of <lora:{name}:…> must be a number, got {text!r}") from None
    if not math.isfinite(weight):
        raise ValueError(f"the weight of <lora:{name}:…> must be a finite number, got {text!r}")
    return weight
