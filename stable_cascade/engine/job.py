"""A job: everything that makes a run's images, resolved once and checked before any model loads.

:class:`Job` holds one attribute per row of the field table (:mod:`stable_cascade.fields`), with the
row's name: every front end builds it from the same names, and every image records it as JSON (with
its own index and seed), so a record is a job that can run again. :meth:`Job.create` fills what was
not given (the preset's stage settings, a random seed, the model's native size, img2img's strength)
and validates everything; :meth:`Job.from_dict` reads a stored job strictly and validates it the same
way. A field that does not apply to the job's task (Stage C settings for reconstruct) holds None.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from stable_cascade.conditioning.emphasis import parse_attention
from stable_cascade.diffusion.presets import COMBINED_PRESETS, StageSettings, get_preset
from stable_cascade.engine.control import ControlRef
from stable_cascade.engine.image_prompts import ImagePromptRef
from stable_cascade.engine.loras import IPAdapterRef, LoraRef
from stable_cascade.engine.resolve import MODEL_FIELDS, resolved_values, spread
from stable_cascade.engine.stored import stored_values
from stable_cascade.fields import FIELDS, LIST_KINDS, STAGE_KEYS, Task, defaults
from stable_cascade.fields import checks as limits
from stable_cascade.limits import MAX_SEED
from stable_cascade.loading.bundles import BUNDLES
from stable_cascade.loading.sources import ModelSources

Stage = Literal["prior", "decoder"]


#: The values of a directly built ``Job()`` (a txt2img job): None where a field does not apply.
_DEFAULTS = defaults()
#: The fields whose value is a tuple of references (LoRAs, IP-Adapters, image prompts).
LIST_FIELDS = tuple(field.name for field in FIELDS if field.kind in LIST_KINDS)


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: ``batch_size * count`` images, image ``i`` drawn with seed ``seed + i``.

    The attributes are the field table's rows, in its order (a test keeps them equal)."""

    task: Task = _DEFAULTS["task"]
    prompt: str = _DEFAULTS["prompt"]
    negative_prompt: str = _DEFAULTS["negative_prompt"]
    emphasis: str = _DEFAULTS["emphasis"]
    input_image: str | None = _DEFAULTS["input_image"]
    input_image_sha256: str | None = _DEFAULTS["input_image_sha256"]
    strength: float | None = _DEFAULTS["strength"]
    image_prompts: tuple[ImagePromptRef, ...] = _DEFAULTS["image_prompts"]
    negative_image_prompts: tuple[ImagePromptRef, ...] = _DEFAULTS["negative_image_prompts"]
    width: int = _DEFAULTS["width"]
    height: int = _DEFAULTS["height"]
    seed: int = _DEFAULTS["seed"]
    batch_size: int = _DEFAULTS["batch_size"]
    count: int = _DEFAULTS["count"]
    preset: str = _DEFAULTS["preset"]
    prior_steps: int | None = _DEFAULTS["prior_steps"]
    prior_guidance: float | None = _DEFAULTS["prior_guidance"]
    prior_sampler: str | None = _DEFAULTS["prior_sampler"]
    prior_shift: float | None = _DEFAULTS["prior_shift"]
    prior_rescale: float | None = _DEFAULTS["prior_rescale"]
    decoder_steps: int = _DEFAULTS["decoder_steps"]
    decoder_guidance: float = _DEFAULTS["decoder_guidance"]
    decoder_sampler: str = _DEFAULTS["decoder_sampler"]
    decoder_shift: float = _DEFAULTS["decoder_shift"]
    decoder_rescale: float = _DEFAULTS["decoder_rescale"]
    model: str = _DEFAULTS["model"]
    prior: str | None = _DEFAULTS["prior"]
    decoder: str | None = _DEFAULTS["decoder"]
    stage_a: str | None = _DEFAULTS["stage_a"]
    effnet: str | None = _DEFAULTS["effnet"]
    previewer: str | None = _DEFAULTS["previewer"]
    components: str | None = _DEFAULTS["components"]
    loras: tuple[LoraRef, ...] = _DEFAULTS["loras"]
    ip_adapters: tuple[IPAdapterRef, ...] = _DEFAULTS["ip_adapters"]
    dtype: str = _DEFAULTS["dtype"]
    controlnet: str | None = _DEFAULTS["controlnet"]
    control_image: str | None = _DEFAULTS["control_image"]
    control_image_sha256: str | None = _DEFAULTS["control_image_sha256"]
    mask: str | None = _DEFAULTS["mask"]
    mask_sha256: str | None = _DEFAULTS["mask_sha256"]
    control_type: str | None = _DEFAULTS["control_type"]
    control_scale: float | None = _DEFAULTS["control_scale"]
    controlnet_sha256: str | None = _DEFAULTS["controlnet_sha256"]

    @classmethod
    def create(cls, **given: Any) -> Job:
        """A resolved, validated job from field values (None: not given); see the module's docstring.

        Also takes ``models`` (a :class:`ModelSources`, for the model fields), ``controls`` (at most one
        :class:`ControlRef`, for the control fields) and ``image_size`` (the input image's (width,
        height), which reconstruct keeps when no size is given). No model is loaded; LoRA files are
        hashed and control images opened and hashed.
        """
        return cls.from_values(resolved_values(given))

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> Job:
        """A validated job of exactly these field values."""
        job = cls(**values)
        job.validate()
        return job

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for any value that cannot run: each field's own check
        (:meth:`Field.check <stable_cascade.fields.Field.check>`), then what fields say together."""
        limits.check_size(self.width, self.height)
        values = self.to_dict()
        for field in FIELDS:
            value = getattr(self, field.name)
            if field.applies(self.task, values):
                field.check(value, self.task)
            elif value not in (None, ()):
                raise ValueError(field.not_applying(self.task))
        limits.check_int("seed", self.seed, 0, MAX_SEED - self.images, " (every image's seed must fit)")
        if self.emphasis != "none":  # the weighting syntax is read (bounded) before any work
            for text in (self.prompt, self.negative_prompt):
                parse_attention(text)
        for name in LIST_FIELDS:
            for ref in getattr(self, name):
                ref.validate()
        bundle = BUNDLES[self.model]
        smallest = min(self.width, self.height)
        if self.decoder is None and smallest < bundle.min_side:
            raise ValueError(
                f"the {bundle.name} model makes images of at least {bundle.min_side} pixels a side, got "
                f"{self.width}x{self.height}; make the image larger"
            )
        prompted = self.image_prompts or self.negative_image_prompts
        if (self.task == "variation" or prompted) and not self.prior and not bundle.image_encoder:
            what = "make variations" if self.task == "variation" else "take image prompts"
            raise ValueError(
                f"the {bundle.name} model has no CLIP image encoder, so it cannot {what}; use "
                "img2img, or pass --prior with a prior pipeline that has an image_encoder"
            )
        for control in self.controls:
            control.validate(self.model)

    @property
    def seeds(self) -> list[int]:
        """Each image's seed: ``seed + i`` for image ``i`` of the job."""
        return [self.seed + i for i in range(self.images)]

    @property
    def images(self) -> int:
        return self.batch_size * self.count

    @property
    def named_loras(self) -> tuple[LoraRef, ...]:
        """The job's LoRAs but those its model ships for a preset (the demo's LCM LoRAs)."""
        shipped = {str(Path(file).resolve()) for _, _, file in BUNDLES[self.model].adapters}
        return tuple(lora for lora in self.loras if lora.path not in shipped)

    @property
    def models(self) -> ModelSources:
        return ModelSources(**{name: getattr(self, name) for name in MODEL_FIELDS})

    @property
    def controls(self) -> tuple[ControlRef, ...]:
        """The job's ControlNet as one reference (none without a ControlNet)."""
        if self.controlnet is None:
            return ()
        assert self.control_image is not None and self.control_scale is not None
        return (
            ControlRef(
                self.controlnet,
                self.control_image,
                self.control_image_sha256,
                self.mask,
                self.mask_sha256,
                self.control_scale,
                self.control_type,
                self.controlnet_sha256,
            ),
        )

    def stage(self, stage: Stage) -> StageSettings | None:
        """How a stage samples: the preset's schedule with the job's settings (None: the stage does not
        run)."""
        steps = getattr(self, f"{stage}_steps")
        if steps is None:
            return None
        preset: StageSettings = getattr(get_preset(self.preset, COMBINED_PRESETS), stage)
        return dataclasses.replace(
            preset,
            **{key: getattr(self, f"{stage}_{key}") for key in STAGE_KEYS},
        )

    @property
    def prior_settings(self) -> StageSettings | None:
        return self.stage("prior")

    @property
    def decoder_settings(self) -> StageSettings:
        settings = self.stage("decoder")
        assert settings is not None, "every task runs Stage B"
        return settings

    def replace(self, **changes: Any) -> Job:
        """This job with ``changes`` (field values; ``models`` and ``controls`` as in :meth:`create`),
        validated."""
        job = dataclasses.replace(self, **spread(changes))
        job.validate()
        return job

    def to_dict(self) -> dict[str, Any]:
        """The fields by name (LoRAs, IP-Adapters and image prompts as dicts): the JSON of records, the
        server's store and batch runs."""
        data = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        for name in LIST_FIELDS:
            data[name] = [dataclasses.asdict(item) for item in getattr(self, name)]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the job") -> Job:
        """A job from :meth:`to_dict`'s form (or an earlier version's nested one); unknown keys and
        wrong types raise a one-line ``ValueError`` naming ``source``."""
        try:
            return cls.from_values(stored_values(data, source))
        except ValueError as error:
            message = str(error)
            raise ValueError(message if message.startswith(source) else f"{source}: {message}") from None


@dataclasses.dataclass(frozen=True)
class Row:
    """Image ``index`` of ``job``: one row of a model call, drawn with seed ``job.seed + index``."""

    job: Job
    index: int

    @property
    def seed(self) -> int:
        return self.job.seed + self.index
