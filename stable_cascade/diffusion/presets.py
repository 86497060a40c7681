"""Sampling settings of one stage, and the named presets, as data (no torch: the command line reads them).

``"diffusers"`` reproduces diffusers' Stable Cascade pipelines (DDPM on the clamped cosine schedule,
plain CFG, the final sample handed on). ``"reference"`` is the sampler of Stability's notebooks
(Stability's ``DDIMSampler`` with ``eta=1``): logSNR shift, CFG rescale, and the last x0 prediction handed on.
``"lcm"`` samples consistency-distilled stages (``stable-cascade train lcm``): 4 + 4 steps of the ``lcm``
sampler on the reference schedule, no guidance; its ``adapters`` tell the engine to attach the model's
LCM LoRAs (see :class:`Preset`).

One name per setting: ``steps``, ``guidance`` (the classifier-free guidance scale), ``sampler``,
``shift`` and ``rescale`` (guidance rescale); a job's fields are these with ``prior_`` / ``decoder_``
in front. Only the diffusers-compatible pipeline signatures keep diffusers' names
(``num_inference_steps``, ``guidance_scale``, ``guidance_rescale``).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal, get_args

ScheduleKind = Literal["diffusers", "reference"]
HandOn = Literal["sample", "x0"]
PresetName = Literal["diffusers", "reference", "lcm"]
SamplerName = Literal["ddim", "ddpm", "dpmpp_2m", "euler_ancestral", "lcm"]
#: The samplers of :mod:`stable_cascade.diffusion.samplers`, by name.
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)


@dataclasses.dataclass(frozen=True)
class StageSettings:
    """How one stage samples."""

    steps: int
    guidance: float
    sampler: str = "ddpm"
    schedule: ScheduleKind = "diffusers"
    shift: float = 1.0
    rescale: float = 0.0
    hand_on: HandOn = "sample"
    timesteps: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Named as the pipelines' arguments, where users pass them.
        for name, argument in (
            ("guidance", "guidance_scale"),
            ("shift", "shift"),
            ("rescale", "guidance_rescale"),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{argument} must be a finite number, got {value!r}")
        if self.timesteps is not None and not all(math.isfinite(t) and 0 <= t <= 1 for t in self.timesteps):
            raise ValueError(f"timesteps must be ratios in [0, 1], got {list(self.timesteps)}")
        if self.timesteps is None and self.steps < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {self.steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be positive (1 = no shift), got {self.shift}")
        if not 0.0 <= self.rescale <= 1.0:
            raise ValueError(f"guidance_rescale must be in [0, 1], got {self.rescale}")
        if self.timesteps is not None and self.schedule != "diffusers":
            raise ValueError(
                "custom timesteps are defined on the 'diffusers' schedule; use preset='diffusers'"
            )

    def override(self, **values: object) -> StageSettings:
        """These settings with every value that is not None replaced."""
        changes = {k: v for k, v in values.items() if v is not None}
        if "timesteps" in changes:
            changes["timesteps"] = tuple(float(t) for t in changes["timesteps"])  # type: ignore[attr-defined]
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]


@dataclasses.dataclass(frozen=True)
class Preset:
    """Both stages' settings; ``adapters``: the kind of LoRAs the stages need (``"lcm"``: a consistency-
    distilled LoRA per stage), which a job takes from its model when the user names none."""

    prior: StageSettings
    decoder: StageSettings
    adapters: str | None = None


_DIFFUSERS = Preset(prior=StageSettings(20, 4.0), decoder=StageSettings(10, 0.0))
_REFERENCE = Preset(
    prior=StageSettings(20, 4.0, schedule="reference", shift=2.0, rescale=0.7, hand_on="x0"),
    decoder=StageSettings(10, 1.1, schedule="reference", shift=1.0, hand_on="x0"),
)
_LCM = Preset(
    prior=StageSettings(4, 1.0, sampler="lcm", schedule="reference", hand_on="x0"),
    decoder=StageSettings(4, 1.0, sampler="lcm", schedule="reference", hand_on="x0"),
    adapters="lcm",
)

#: Presets of the prior and decoder pipelines (diffusers' defaults of each pipeline alone); with ``lcm``
#: a pipeline samples the LCM LoRAs loaded into it (``load_lora_weights``).
PRESETS: dict[str, Preset] = {"diffusers": _DIFFUSERS, "reference": _REFERENCE, "lcm": _LCM}

#: Presets of the whole cascade — the combined pipeline, and every job of the command line, the
#: server and batch runs: diffusers' combined defaults are Würstchen v2's 60 + 12 steps.
COMBINED_PRESETS: dict[str, Preset] = {
    "diffusers": Preset(
        prior=dataclasses.replace(_DIFFUSERS.prior, steps=60),
        decoder=dataclasses.replace(_DIFFUSERS.decoder, steps=12),
    ),
    "reference": _REFERENCE,
    "lcm": _LCM,
}
DEFAULT_PRESET = "reference"


def get_preset(name: str, table: dict[str, Preset] = PRESETS) -> Preset:
    try:
        return table[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of: {', '.join(table)}") from None


def stage_settings(
    preset: str | StageSettings, stage: Literal["prior", "decoder"], table: dict[str, Preset] = PRESETS
) -> StageSettings:
    """One stage's settings: a preset's by name, or the settings themselves (a job's, resolved)."""
    if isinstance(preset, StageSettings):
        return preset
    return getattr(get_preset(preset, table), stage)  # type: ignore[no-any-return]
