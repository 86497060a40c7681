"""A job: everything that makes a run's images, resolved once and checked before any model loads.

:class:`Job` is the one shape of a run's settings: the CLI builds it from flags, the server from
requests, and every image records it as JSON (with its own index and seed), so a record is a job that
can run again. :meth:`Job.create` fills what was not given (the preset's stage settings, a random seed,
the model's native size, img2img's strength 0.8) and validates everything; :meth:`Job.from_dict` reads a
stored job strictly and validates it the same way.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

from stable_cascade.diffusion.presets import PRESETS, StageSettings, get_preset
from stable_cascade.diffusion.samplers import SAMPLERS
from stable_cascade.engine import checks
from stable_cascade.engine.control import ControlRef, check_controls, resolve_control, super_resolution_size
from stable_cascade.engine.hashing import sha256_file
from stable_cascade.loading.bundles import BUNDLES, DEFAULT_BUNDLE
from stable_cascade.loading.sources import ModelSources

Task = Literal["txt2img", "img2img", "variation", "reconstruct"]
TASKS: tuple[str, ...] = get_args(Task)
DTYPES = ("auto", "bf16", "fp16", "fp32")
DEFAULT_SIZE = 1024
DEFAULT_STRENGTH = 0.8  # the reference notebook's image-to-image strength


def random_seed() -> int:
    return secrets.randbelow(2**32)


@dataclasses.dataclass(frozen=True)
class StageJob:
    """How one stage samples: the preset's settings with every override applied."""

    steps: int
    guidance: float
    sampler: str
    shift: float
    rescale: float

    @classmethod
    def from_settings(cls, settings: StageSettings) -> StageJob:
        return cls(
            steps=settings.num_inference_steps,
            guidance=settings.guidance_scale,
            sampler=settings.sampler,
            shift=settings.shift,
            rescale=settings.guidance_rescale,
        )

    def validate(self, stage: str) -> None:
        checks.check_int(f"{stage} steps", self.steps, 1, checks.MAX_STEPS)
        checks.check_float(f"{stage} guidance", self.guidance, 0.0, 100.0)
        checks.check_choice(f"{stage} sampler", self.sampler, tuple(sorted(SAMPLERS)))
        checks.check_float(f"{stage} shift", self.shift, 0.0, 100.0, open_low=True)
        checks.check_float(f"{stage} guidance rescale", self.rescale, 0.0, 1.0)

    def arguments(self, preset: str) -> dict[str, Any]:
        """The keyword arguments of a prior or decoder pipeline call that sample with these settings."""
        return {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "sampler": self.sampler,
            "shift": self.shift,
            "guidance_rescale": self.rescale,
            "preset": preset,
        }


@dataclasses.dataclass(frozen=True)
class LoraRef:
    """A Stage C LoRA of a job: its file (absolute path), scale and sha256."""

    path: str
    scale: float = 1.0
    sha256: str | None = None

    def validate(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"a LoRA's path must be a file name, got {self.path!r}")
        checks.check_float(f"the scale of LoRA {self.path}", self.scale, -100.0, 100.0)
        if self.sha256 is not None and not isinstance(self.sha256, str):
            raise ValueError(f"the sha256 of LoRA {self.path} must be text, got {self.sha256!r}")


@dataclasses.dataclass(frozen=True)
class Job:
    """One run: ``batch_size * count`` images, image ``i`` drawn with seed ``seed + i``."""

    task: Task = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    width: int = DEFAULT_SIZE
    height: int = DEFAULT_SIZE
    seed: int = 0
    batch_size: int = 1
    count: int = 1
    preset: str = "reference"
    prior: StageJob | None = dataclasses.field(
        default_factory=lambda: StageJob.from_settings(PRESETS["reference"].prior)
    )
    decoder: StageJob = dataclasses.field(
        default_factory=lambda: StageJob.from_settings(PRESETS["reference"].decoder)
    )
    strength: float | None = None
    input_image: str | None = None
    input_image_sha256: str | None = None
    models: ModelSources = dataclasses.field(default_factory=ModelSources)
    loras: tuple[LoraRef, ...] = ()
    dtype: str = "auto"
    controls: tuple[ControlRef, ...] = ()

    @classmethod
    def create(
        cls,
        *,
        task: str = "txt2img",
        prompt: str = "",
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        seed: int | None = None,
        preset: str = "reference",
        prior_steps: int | None = None,
        prior_guidance: float | None = None,
        prior_sampler: str | None = None,
        prior_shift: float | None = None,
        prior_rescale: float | None = None,
        decoder_steps: int | None = None,
        decoder_guidance: float | None = None,
        decoder_sampler: str | None = None,
        decoder_shift: float | None = None,
        decoder_rescale: float | None = None,
        strength: float | None = None,
        batch_size: int = 1,
        count: int = 1,
        models: ModelSources | None = None,
        loras: Sequence[LoraRef | tuple[str | Path, float]] = (),
        dtype: str = "auto",
        input_image: str | None = None,
        input_image_sha256: str | None = None,
        image_size: tuple[int, int] | None = None,
        controls: Sequence[ControlRef] = (),
    ) -> Job:
        """A resolved, validated job; ``None`` values take their defaults (see the module's docstring).

        ``image_size`` (width, height): the input image's size, which reconstruct keeps (rounded down to
        multiples of 8) when no size is given. No model is loaded; LoRA files are hashed. ``controls``
        are resolved by :func:`~stable_cascade.engine.control.resolve_control` (images opened and hashed);
        super-resolution's size defaults to twice its control image's.
        """
        checks.check_choice("task", task, TASKS)
        checks.check_choice("preset", preset, PRESETS)
        sources = _absolute(models or ModelSources())
        resolved = [resolve_control(control) for control in controls]
        for control, size in resolved:
            if control.control_type == "super_resolution" and width is None and height is None:
                width, height = super_resolution_size(size)
        width, height = _size(task, width, height, sources, image_size)
        given = {
            "prior": (prior_steps, prior_guidance, prior_sampler, prior_shift, prior_rescale),
            "decoder": (decoder_steps, decoder_guidance, decoder_sampler, decoder_shift, decoder_rescale),
        }
        stages = {
            name: _stage(getattr(get_preset(preset, PRESETS), name), values) for name, values in given.items()
        }
        if strength is None and task == "img2img":
            strength = DEFAULT_STRENGTH
        job = cls(
            task=task,  # type: ignore[arg-type]  # checked above
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            seed=random_seed() if seed is None else seed,
            batch_size=batch_size,
            count=count,
            preset=preset,
            prior=None if task == "reconstruct" else stages["prior"],
            decoder=stages["decoder"],
            strength=strength,
            input_image=input_image,
            input_image_sha256=input_image_sha256,
            models=sources,
            loras=tuple(_lora(lora) for lora in loras),
            dtype=dtype,
            controls=tuple(control for control, _ in resolved),
        )
        job.validate()
        return job

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for any value that cannot run."""
        checks.check_choice("task", self.task, TASKS)
        checks.check_text("prompt", self.prompt)
        checks.check_text("negative prompt", self.negative_prompt)
        checks.check_size(self.width, self.height)
        checks.check_int("batch size", self.batch_size, 1, checks.MAX_BATCH_SIZE)
        checks.check_int("count", self.count, 1, checks.MAX_COUNT)
        images = self.batch_size * self.count
        checks.check_int("seed", self.seed, 0, checks.MAX_SEED - images, " (every image's seed must fit)")
        checks.check_choice("preset", self.preset, PRESETS)
        checks.check_choice("dtype", self.dtype, DTYPES)
        if (self.prior is None) != (self.task == "reconstruct"):
            raise ValueError("a job has Stage C settings (prior) unless its task is reconstruct")
        if self.prior is not None:
            self.prior.validate("Stage C")
        self.decoder.validate("Stage B")
        if (self.strength is not None) != (self.task == "img2img"):
            raise ValueError(f"strength applies to img2img only, not to {self.task}")
        if self.strength is not None:
            checks.check_float("strength", self.strength, 0.0, 1.0)
        if self.task == "txt2img" and self.input_image_sha256 is not None:
            raise ValueError("txt2img takes no input image, but the job names one")
        if self.task != "txt2img" and not isinstance(self.input_image_sha256, str):
            raise ValueError(f"{self.task} needs the input image's sha256 (see image_sha256)")
        if self.models.model is not None:
            checks.check_choice("model", self.models.model, BUNDLES)
        for lora in self.loras:
            lora.validate()
        bundle = BUNDLES[self.models.model or DEFAULT_BUNDLE]
        if self.task == "variation" and not self.models.prior and not bundle.image_encoder:
            raise ValueError(
                f"the {bundle.name} model has no CLIP image encoder, so it cannot make variations; use "
                "img2img, or pass --prior with a prior pipeline that has an image_encoder"
            )
        if self.loras and self.task == "reconstruct":
            raise ValueError("LoRAs adapt Stage C, which reconstruct does not run")
        check_controls(self)

    @property
    def seeds(self) -> list[int]:
        """Each image's seed: ``seed + i`` for image ``i`` of the job."""
        return [self.seed + i for i in range(self.batch_size * self.count)]

    @property
    def images(self) -> int:
        return self.batch_size * self.count

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["loras"] = [dataclasses.asdict(lora) for lora in self.loras]
        data["controls"] = [dataclasses.asdict(control) for control in self.controls]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "the job") -> Job:
        """A job from :meth:`to_dict`'s form; unknown keys and wrong types raise a ``ValueError``."""
        from stable_cascade.engine.decoding import decode_job  # the strict reader lives apart

        job = decode_job(cls, data, source)
        try:
            job.validate()
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None
        return job


def _stage(preset: StageSettings, values: tuple[Any, ...]) -> StageJob:
    steps, guidance, sampler, shift, rescale = values
    resolved = StageJob.from_settings(preset)
    changes = dict(steps=steps, guidance=guidance, sampler=sampler, shift=shift, rescale=rescale)
    return dataclasses.replace(resolved, **{k: v for k, v in changes.items() if v is not None})


def _size(
    task: str, width: int | None, height: int | None, sources: ModelSources, image: tuple[int, int] | None
) -> tuple[int, int]:
    """The output size: the one given, else reconstruct's input size, else the model's native one."""
    if (width is None) != (height is None) and task == "reconstruct":
        raise ValueError("give reconstruct both a width and a height, or neither (the image's size is kept)")
    if task == "reconstruct" and width is None and height is None:
        if image is None:
            raise ValueError("reconstruct needs the input image's size (image_size) or a width and height")
        return _multiple_below(image[0]), _multiple_below(image[1])
    native = DEFAULT_SIZE if sources.prior else get_bundle_size(sources)
    return (native if width is None else width), (native if height is None else height)


def _multiple_below(side: int) -> int:
    return max(checks.SIZE_MULTIPLE, side // checks.SIZE_MULTIPLE * checks.SIZE_MULTIPLE)


def get_bundle_size(sources: ModelSources) -> int:
    """The side the named model bundle was trained at (demo: 128, else 1024)."""
    return BUNDLES[sources.model or DEFAULT_BUNDLE].default_size


def native_size(sources: ModelSources) -> int | None:
    """The bundle's native side when the bundle supplies Stage C, else None (any size fits)."""
    return None if sources.prior else get_bundle_size(sources)


def _absolute(sources: ModelSources) -> ModelSources:
    """``sources`` with the bundle named and local paths made absolute (so records run anywhere)."""
    if sources.model is not None:
        checks.check_choice("model", sources.model, BUNDLES)
    values = {}
    for field in dataclasses.fields(sources):
        value = getattr(sources, field.name)
        if isinstance(value, str) and field.name != "model" and Path(value).exists():
            values[field.name] = str(Path(value).resolve())
    return dataclasses.replace(sources, model=sources.model or DEFAULT_BUNDLE, **values)


def _lora(lora: LoraRef | tuple[str | Path, float]) -> LoraRef:
    """A job's LoRA with its absolute path and sha256 (a missing file raises ``ValueError``)."""
    ref = lora if isinstance(lora, LoraRef) else LoraRef(str(lora[0]), float(lora[1]))
    path = Path(ref.path)
    if not path.is_file():
        raise ValueError(f"LoRA file {ref.path} does not exist; pass an existing .safetensors file")
    return dataclasses.replace(ref, path=str(path.resolve()), sha256=ref.sha256 or sha256_file(path))
