"""One model call: rows of images of jobs that share their settings, through the one cascade run.

A row is image ``index`` of a job, drawn from ``torch.Generator().manual_seed(job.seed + index)`` with
its job's prompts. A job runs as its batches of rows; a batch run groups rows of several jobs (other
prompts and seeds, the same settings) into one call. Each distinct text is encoded once, alone (as a
job of one prompt encodes it), by :class:`~stable_cascade.engine.texts.TextCache`. Stage C → Stage B
→ Stage A runs through :func:`~stable_cascade.pipelines.cascade.run_cascade`; reconstruct runs Stage B
and Stage A on the input image's EfficientNet latent.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

import PIL.Image
import torch

from stable_cascade.conditioning.emphasis import Emphasis, encode_weighted, is_plain
from stable_cascade.engine.control import ControlImages
from stable_cascade.engine.events import BatchSkipped, Event, ImageDone, JobCancelled, Preview, Progress
from stable_cascade.engine.job import Job, Row
from stable_cascade.engine.models import LoadedModels
from stable_cascade.engine.record import ImageRecord
from stable_cascade.engine.texts import TextCache
from stable_cascade.pipelines.cascade import run_cascade
from stable_cascade.pipelines.control import ControlRequest
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.outputs import ImagePipelineOutput
from stable_cascade.pipelines.previews import PreviewCallback

Emit = Callable[[Event], None]
Stage = Literal["prior", "decoder"]


def prior_steps(job: Job) -> int:
    """The Stage C steps that run: img2img runs the last ``round(steps · strength)``."""
    if job.prior_steps is None:
        return 0
    if job.task == "img2img" and job.strength is not None and job.strength < 1:
        return round(job.prior_steps * job.strength)
    return job.prior_steps


@dataclasses.dataclass
class Calls:
    """What the model calls of one job (or one batch unit) share: the models, the input images, where
    events go, and the running totals of steps and seconds."""

    models: LoadedModels
    texts: TextCache
    record_job: Callable[[Job], Job]
    model_sha256: dict[str, str]
    image: PIL.Image.Image | None = None
    control: ControlImages | None = None
    emit: Emit = lambda event: None
    stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    skip: threading.Event = dataclasses.field(default_factory=threading.Event)
    previews: bool = False
    total_steps: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=lambda: {"prior": 0.0, "decoder": 0.0})
    _done: int = 0
    _prior_end: float = 0.0

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise JobCancelled("the job was cancelled")
        if self.skip.is_set():
            self.skip.clear()
            raise BatchSkipped("the batch was skipped")

    def make(self, rows: Sequence[Row], batch: int = 0, batches: int = 1) -> list[ImageDone]:
        """The images of ``rows`` (jobs with the same settings), one model call per stage."""
        job = rows[0].job
        generators = [torch.Generator().manual_seed(row.seed) for row in rows]
        self._prior_end = start = time.perf_counter()
        if job.task == "reconstruct":
            images = self._reconstruct(rows, generators, batch, batches)
        else:
            images = self._cascade(rows, generators, batch, batches)
        self._synchronize()
        self.seconds["prior"] += self._prior_end - start  # until Stage C's last step
        self.seconds["decoder"] += time.perf_counter() - self._prior_end
        done = []
        for row, picture in zip(rows, images, strict=True):
            record = ImageRecord(
                job=self.record_job(row.job),
                index=row.index,
                seed=row.seed,
                width=picture.width,
                height=picture.height,
                model_sha256=self.model_sha256,
            )
            done.append(ImageDone(row.index, picture, record))
        return done

    def _cascade(
        self, rows: Sequence[Row], generators: list[torch.Generator], batch: int, batches: int
    ) -> list[PIL.Image.Image]:
        job = rows[0].job
        prior_pipe = self.models.prior_pipe
        assert prior_pipe is not None and job.prior_steps is not None, "text-to-image tasks load the prior"
        guided = job.stage("prior").guidance > 1  # type: ignore[union-attr]  # checked above
        prior = self.texts.arguments(prior_pipe, rows, guided) | {
            "generator": generators,
            "preset": job.stage("prior"),
            **self._inputs(job),
        }
        preview = PreviewCallback(on_preview=self._preview(rows)) if self.previews else None
        prior["callback_on_step_end"] = self._callback("prior", prior_steps(job), batch, batches, preview)
        prior["callback_on_step_end_tensor_inputs"] = PreviewCallback.tensor_inputs if preview else ()
        decoder = {
            "generator": generators,
            "preset": job.decoder_settings,
            "callback_on_step_end": self._callback("decoder", job.decoder_steps, batch, batches, None),
            "callback_on_step_end_tensor_inputs": (),
        }
        paste = ControlRequest(self.control.image, self.control.mask) if self.control else None
        out = run_cascade(
            prior_pipe,
            self.models.decoder_pipe,
            prior,
            decoder,
            height=job.height,
            width=job.width,
            paste=paste,
        )
        assert isinstance(out, ImagePipelineOutput)
        return cast(list[PIL.Image.Image], out.images)

    def _inputs(self, job: Job) -> dict[str, Any]:
        """The prior's image and control arguments of the job's task."""
        arguments: dict[str, Any] = {}
        if job.task == "img2img":
            arguments.update(image=self.image, strength=job.strength)
        elif job.task == "variation":
            arguments["images"] = [self.image]
        if self.control is not None:
            control = job.controls[0]
            arguments.update(
                control_image=self.control.image,
                mask_image=self.control.mask,
                controlnet_conditioning_scale=control.scale,
                control_type=control.control_type,
            )
        return arguments

    def _reconstruct(
        self, rows: Sequence[Row], generators: list[torch.Generator], batch: int, batches: int
    ) -> list[PIL.Image.Image]:
        job = rows[0].job
        assert self.image is not None, "reconstruct takes an input image"
        out = self.models.decoder_pipe.reconstruct(
            self.image,
            **_stage_b_texts(self.models.decoder_pipe, job),
            height=job.height,
            width=job.width,
            num_images_per_prompt=len(rows),
            generator=generators,
            preset=job.decoder_settings,
            callback_on_step_end=self._callback("decoder", job.decoder_steps, batch, batches, None),
            callback_on_step_end_tensor_inputs=(),
        )
        assert isinstance(out, ImagePipelineOutput)
        return cast(list[PIL.Image.Image], out.images)

    def _preview(self, rows: Sequence[Row]) -> Callable[[int, list[PIL.Image.Image]], None]:
        def each(step: int, images: list[PIL.Image.Image]) -> None:
            for row, picture in zip(rows, images, strict=False):
                self.emit(Preview(row.index, step, picture))

        return each

    def _callback(
        self, stage: Stage, steps: int, batch: int, batches: int, preview: PreviewCallback | None
    ) -> Any:
        counter = [0]

        def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            counter[0] += 1
            self._done += 1
            fraction = min(1.0, self._done / self.total_steps) if self.total_steps else 1.0
            self.emit(Progress(stage, min(counter[0], steps), steps, batch, batches, fraction))
            if stage == "prior" and counter[0] == steps:
                self._prior_end = time.perf_counter()
            if preview is not None:
                preview(pipeline, index, timestep, tensors)
            self.check_stop()
            return {}

        return on_step

    def _synchronize(self) -> None:
        device = self.models.decoder_pipe.execution_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)


def _stage_b_texts(pipe: StableCascadeDecoderPipeline, job: Job) -> dict[str, Any]:
    """Stage B's text arguments when it runs alone (reconstruct): the prompts, or with the weighting
    syntax their embeddings as the cascade hands Stage C's on (the first chunk's)."""
    if job.emphasis == "none" or (is_plain(job.prompt) and is_plain(job.negative_prompt)):
        return {"prompt": job.prompt, "negative_prompt": job.negative_prompt or None}
    encoder, length = pipe.activate("text_encoder"), int(pipe.tokenizer.model_max_length)
    emphasis = cast(Emphasis, job.emphasis)
    cond, uncond = (
        encode_weighted(pipe.tokenizer, encoder, text, emphasis, pipe.execution_device)
        for text in (job.prompt, job.negative_prompt)
    )
    return {
        "prompt": None,
        "prompt_embeds": cond.hidden[:, :length],
        "prompt_embeds_pooled": cond.pooled,
        "negative_prompt_embeds": uncond.hidden[:, :length],
        "negative_prompt_embeds_pooled": uncond.pooled,
    }
