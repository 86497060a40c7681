"""AUTOMATIC1111's names that need more than a row's ``choice_names``: sampler names with a scheduler
suffix ("DPM++ 2M Karras": AUTOMATIC1111 before 1.9 named sampler and scheduler together) and its
``scheduler`` ("Schedule type") names.

Stable Cascade samples on its own noise schedule (the cosine schedule with a shift, see
:mod:`stable_cascade.diffusion.cosine`), so every AUTOMATIC1111 scheduler runs as that schedule: a
name with a known scheduler suffix maps to its sampler, and the response and the image's infotext
name the sampler that ran ("DPM++ 2M").
"""

from __future__ import annotations

from stable_cascade.fields.table import BY_NAME

#: AUTOMATIC1111's schedulers ("Schedule type"), longest first for suffix matching.
A1111_SCHEDULERS = (
    "Align Your Steps",
    "Polyexponential",
    "Exponential",
    "SGM Uniform",
    "KL Optimal",
    "Automatic",
    "Uniform",
    "Karras",
    "Simple",
    "Normal",
    "DDIM",
    "Beta",
)
_NOTE = (
    "; a scheduler suffix (Karras, Exponential, SGM Uniform, …) is taken and runs as Stable Cascade's "
    "own noise schedule"
)


def sampler(name: object, what: str = "sampler") -> str:
    """Our sampler for an AUTOMATIC1111 sampler name (case-insensitive, with or without a scheduler
    suffix) or one of ours; a one-line ``ValueError`` naming the accepted ones."""
    field = BY_NAME["prior_sampler"]
    if isinstance(name, str):
        text = name.strip()
        for suffix in A1111_SCHEDULERS:
            if text.lower().endswith(" " + suffix.lower()):
                base = text[: -len(suffix)].strip()
                try:
                    return field.choice(base, what)
                except ValueError:
                    break
    try:
        return field.choice(name, what)
    except ValueError as error:
        raise ValueError(f"{error}{_NOTE}") from None


def scheduler(name: object) -> str:
    """An AUTOMATIC1111 scheduler, by label or name ("SGM Uniform", "sgm_uniform"): each runs as Stable
    Cascade's own schedule."""
    if isinstance(name, str):
        for known in A1111_SCHEDULERS:
            if name.strip().replace("_", " ").lower() == known.lower():
                return known
    raise ValueError(
        f"unknown scheduler {name!r}; expected one of {', '.join(A1111_SCHEDULERS)} (each runs as Stable "
        "Cascade's own noise schedule)"
    )
