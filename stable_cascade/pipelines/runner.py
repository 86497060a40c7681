"""Runs of the cascade as the command line makes them: stage by stage, timed, each image with its record.

A :class:`Request` holds a run's settings (None: the preset's value); :class:`Runner` calls the prior
pipeline and then the decoder pipeline as ``StableCascadeCombinedPipeline.__call__`` does (Stage B
takes the prior's text embeddings), so the images are the combined pipeline's, and times each stage.
Batch item ``i`` draws from ``torch.Generator().manual_seed(seed + i)``, so it equals a single run
with seed ``seed + i``; batch ``b`` of a run continues the seeds where batch ``b - 1`` stopped.
"""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from stable_cascade.diffusion.samplers import get_sampler
from stable_cascade.pipelines.metadata import (
    TASKS,
    FileHasher,
    GenerationParameters,
    StageParameters,
    Task,
    sha256_file,
)
from stable_cascade.pipelines.outputs import StableCascadePriorPipelineOutput
from stable_cascade.pipelines.presets import PRESETS, StageSettings, get_preset
from stable_cascade.pipelines.previews import PreviewCallback
from stable_cascade.pipelines.sizes import check_image_size
from stable_cascade.pipelines.sources import LoadedModels

DEFAULT_SIZE = 1024
DEFAULT_STRENGTH = 0.8  # the reference notebook's image-to-image strength
MAX_SEED = 2**63 - 1
#: The prior outputs the decoder takes (the combined pipeline hands them on the same way).
_HANDED_ON = (
    "image_embeddings",
    "prompt_embeds",
    "prompt_embeds_pooled",
    "negative_prompt_embeds",
    "negative_prompt_embeds_pooled",
)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

#: ``on_preview(image index in the run, step, preview)``.
PreviewSink = Callable[[int, int, PIL.Image.Image], None]


def random_seed() -> int:
    return secrets.randbelow(2**32)


@dataclasses.dataclass(frozen=True)
class Request:
    """What to generate. ``None`` settings take the preset's value; ``width``/``height`` None: 1024
    (reconstruct: the input image's size); ``seed`` None: a random seed (see :meth:`seeded`)."""

    task: Task = "txt2img"
    prompt: str = ""
    negative_prompt: str = ""
    width: int | None = None
    height: int | None = None
    seed: int | None = None
    preset: str = "reference"
    prior_steps: int | None = None
    prior_guidance: float | None = None
    prior_sampler: str | None = None
    prior_shift: float | None = None
    prior_rescale: float | None = None
    decoder_steps: int | None = None
    decoder_guidance: float | None = None
    decoder_sampler: str | None = None
    decoder_shift: float | None = None
    decoder_rescale: float | None = None
    strength: float | None = None
    batch_size: int = 1
    count: int = 1

    @classmethod
    def from_parameters(cls, parameters: GenerationParameters, task: Task) -> Request:
        """The request that reproduces an image's ``parameters`` (as a ``task`` run)."""
        values: dict[str, Any] = {
            "task": task,
            "prompt": parameters.prompt,
            "negative_prompt": parameters.negative_prompt,
            "width": parameters.width,
            "height": parameters.height,
            "seed": parameters.seed,
            "preset": parameters.preset,
            "strength": parameters.strength if task == "img2img" else None,
        }
        for name, stage in (("prior", parameters.prior), ("decoder", parameters.decoder)):
            if stage is not None:
                values.update({f"{name}_{key}": value for key, value in dataclasses.asdict(stage).items()})
        return cls(**values)

    def seeded(self) -> Request:
        """This request with a random seed when it has none."""
        return self if self.seed is not None else dataclasses.replace(self, seed=random_seed())

    def stage_settings(self) -> tuple[StageSettings, StageSettings]:
        """Both stages' settings: the preset's with this request's values (checked)."""
        preset = get_preset(self.preset, PRESETS)
        settings = tuple(
            getattr(preset, stage).override(
                num_inference_steps=getattr(self, f"{stage}_steps"),
                guidance_scale=getattr(self, f"{stage}_guidance"),
                sampler=getattr(self, f"{stage}_sampler"),
                shift=getattr(self, f"{stage}_shift"),
                guidance_rescale=getattr(self, f"{stage}_rescale"),
            )
            for stage in ("prior", "decoder")
        )
        for stage in settings:
            get_sampler(stage.sampler)
        return settings[0], settings[1]

    def check(self) -> None:
        """Raise a ``ValueError`` for settings that cannot run, before any model is loaded."""
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if (self.width is None) != (self.height is None) and self.task == "reconstruct":
            raise ValueError("give both width and height, or neither (then the image's size is kept)")
        check_image_size(self.height or DEFAULT_SIZE, self.width or DEFAULT_SIZE)
        for name in ("batch_size", "count"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be at least 1, got {getattr(self, name)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED - self.batch_size * self.count:
            raise ValueError(f"seed must be in [0, 2**63) with room for every image's seed, got {self.seed}")
        if self.strength is not None:
            if self.task != "img2img":
                raise ValueError(f"strength applies to img2img only, not to {self.task}")
            if not 0.0 <= self.strength <= 1.0:
                raise ValueError(f"strength must be in [0, 1] (1: ignore the image), got {self.strength}")
        self.stage_settings()

    @property
    def seeds(self) -> list[int]:
        """Each image's seed: ``seed + i`` for image ``i`` of the run."""
        if self.seed is None:
            raise ValueError("the request has no seed: call request.seeded() first")
        return [self.seed + i for i in range(self.batch_size * self.count)]


@dataclasses.dataclass(frozen=True)
class InputImage:
    """An image given to img2img, variation or reconstruct, with its file name and sha256."""

    image: PIL.Image.Image
    name: str
    sha256: str

    @classmethod
    def open(cls, path: str | Path) -> InputImage:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"image {path} does not exist")
        try:
            with PIL.Image.open(path) as file:
                image = file.convert("RGB")
        except (PIL.UnidentifiedImageError, OSError) as error:
            raise ValueError(f"{path} is not a readable image: {error}") from error
        return cls(image, path.name, sha256_file(path))


@dataclasses.dataclass(frozen=True)
class GeneratedImage:
    image: PIL.Image.Image
    parameters: GenerationParameters
    index: int  # in the run


@dataclasses.dataclass
class StageTimes:
    """Seconds spent in Stage C (the prior pipeline) and in Stage B + A (the decoder pipeline)."""

    prior: float = 0.0
    decoder: float = 0.0


class Runner:
    """Generates the images of requests with loaded models, recording and timing each stage."""

    def __init__(self, models: LoadedModels, hasher: FileHasher | None = None) -> None:
        self.models = models
        self.hasher = hasher or FileHasher()
        self.times = StageTimes()

    def run(
        self, request: Request, image: InputImage | None = None, on_preview: PreviewSink | None = None
    ) -> Iterator[GeneratedImage]:
        """The request's images, batch by batch; ``request`` needs a seed (:meth:`Request.seeded`)."""
        every_seed = request.seeds
        request.check()
        if (request.task != "txt2img") != (image is not None):
            raise ValueError(f"{request.task} {'needs' if image is None else 'takes no'} input image")
        prior, decoder = request.stage_settings()
        for batch in range(request.count):
            first = batch * request.batch_size
            seeds = every_seed[first : first + request.batch_size]
            images = self._batch(request, prior, decoder, image, seeds, first, on_preview)
            for i, output in enumerate(images):
                parameters = self._parameters(request, prior, decoder, image, output, seeds[i], i)
                yield GeneratedImage(output, parameters, first + i)

    def _batch(
        self,
        request: Request,
        prior: StageSettings,
        decoder: StageSettings,
        image: InputImage | None,
        seeds: list[int],
        first: int,
        on_preview: PreviewSink | None,
    ) -> list[PIL.Image.Image]:
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        if request.task == "reconstruct":
            assert image is not None
            given = {
                "image": image.image,
                "prompt": request.prompt,
                "negative_prompt": request.negative_prompt or None,
                "height": request.height,
                "width": request.width,
            }
            return self._decoder(
                request, decoder, generators, lambda group: {**given, "num_images_per_prompt": len(group)}
            )
        size = {"height": request.height or DEFAULT_SIZE, "width": request.width or DEFAULT_SIZE}
        handed_on = self._prior(request, prior, image, generators, size, first, on_preview)
        return self._decoder(
            request,
            decoder,
            generators,
            lambda group: {**size, **{k: None if v is None else v[group] for k, v in handed_on.items()}},
        )

    def _prior(
        self,
        request: Request,
        settings: StageSettings,
        image: InputImage | None,
        generators: list[torch.Generator],
        size: dict[str, int],
        first: int,
        on_preview: PreviewSink | None,
    ) -> dict[str, torch.Tensor | None]:
        """Stage C for every item: the outputs Stage B takes (as the combined pipeline hands them on)."""
        prior_pipe = self.models.prior_pipe
        assert prior_pipe is not None, "text-to-image tasks load the prior"
        arguments: dict[str, Any] = {"negative_prompt": request.negative_prompt or None, **size}
        arguments.update(_stage_arguments(settings, request.preset))
        if request.task == "img2img":
            assert image is not None
            arguments.update(image=image.image, strength=_strength(request))
        elif request.task == "variation":
            assert image is not None
            arguments["images"] = [image.image]
        if on_preview is not None:
            callback = _preview_callback(on_preview, first)
            arguments["callback_on_step_end"] = callback
            arguments["callback_on_step_end_tensor_inputs"] = callback.tensor_inputs
        out = self._timed(
            "prior",
            prior_pipe,
            request.prompt,
            num_images_per_prompt=len(generators),
            generator=generators,
            **arguments,
        )
        assert isinstance(out, StableCascadePriorPipelineOutput)
        return {name: getattr(out, name) for name in _HANDED_ON}

    def _decoder(
        self,
        request: Request,
        settings: StageSettings,
        generators: list[torch.Generator],
        inputs: Callable[[list[int]], dict[str, Any]],
    ) -> list[PIL.Image.Image]:
        """Stage B and Stage A for every item (``inputs(group)``: the call's inputs for those items)."""
        pipe = self.models.decoder_pipe
        call = pipe.reconstruct if request.task == "reconstruct" else pipe
        arguments = {**inputs(list(range(len(generators)))), **_stage_arguments(settings, request.preset)}
        images: list[PIL.Image.Image] = self._timed("decoder", call, generator=generators, **arguments).images
        return images

    def _timed(self, stage: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = call(*args, **kwargs)
        device = self.models.decoder_pipe.execution_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        setattr(self.times, stage, getattr(self.times, stage) + time.perf_counter() - start)
        return out

    def _parameters(
        self,
        request: Request,
        prior: StageSettings,
        decoder: StageSettings,
        image: InputImage | None,
        output: PIL.Image.Image,
        seed: int,
        index: int,
    ) -> GenerationParameters:
        models = self.models
        return GenerationParameters(
            task=request.task,
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=seed,
            width=output.width,
            height=output.height,
            preset=request.preset,
            prior=None if request.task == "reconstruct" else _record(prior),
            decoder=_record(decoder),
            dtype=_DTYPE_NAMES.get(models.decoder_pipe.dtype, str(models.decoder_pipe.dtype)),
            strength=_strength(request) if request.task == "img2img" else None,
            input_image=image.name if image is not None else None,
            input_image_sha256=image.sha256 if image is not None else None,
            models=dict(models.models),
            model_sha256={role: self.hasher.sha256(path) for role, path in models.local_files.items()},
            batch_index=index,
            batch_size=request.batch_size,
        )


def _strength(request: Request) -> float:
    return DEFAULT_STRENGTH if request.strength is None else request.strength


def _stage_arguments(settings: StageSettings, preset: str) -> dict[str, Any]:
    return {
        "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        "sampler": settings.sampler,
        "shift": settings.shift,
        "guidance_rescale": settings.guidance_rescale,
        "preset": preset,
    }


def _record(settings: StageSettings) -> StageParameters:
    return StageParameters(
        steps=settings.num_inference_steps,
        guidance=settings.guidance_scale,
        sampler=settings.sampler,
        shift=settings.shift,
        rescale=settings.guidance_rescale,
    )


def _preview_callback(sink: PreviewSink, first: int) -> PreviewCallback:
    """A Stage C callback handing each preview to ``sink`` with its image's index in the run."""

    def each(step: int, previews: list[PIL.Image.Image]) -> None:
        for index, preview in enumerate(previews):
            sink(first + index, step, preview)

    return PreviewCallback(on_preview=each)
