"""One job on loaded models: batch by batch, Stage C then Stage B + A, timed, reporting every step.

The prior pipeline and then the decoder pipeline are called as ``StableCascadeCombinedPipeline``
does (Stage B takes the prior's text embeddings), so the images are the combined pipeline's. Batch
item ``i`` draws from ``torch.Generator().manual_seed(seed + i)``; batch ``b`` continues the seeds
where batch ``b - 1`` stopped.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import PIL.Image
import torch

from stable_cascade.engine.control import ControlImages, ControlRef
from stable_cascade.engine.events import Event, ImageDone, JobCancelled, Preview, Progress
from stable_cascade.engine.job import Job, StageJob
from stable_cascade.engine.models import LoadedModels
from stable_cascade.engine.record import ImageRecord
from stable_cascade.pipelines.control import ControlRequest, paste_unmasked
from stable_cascade.pipelines.outputs import StableCascadePriorPipelineOutput, postprocess
from stable_cascade.pipelines.previews import PreviewCallback

Emit = Callable[[Event], None]
Stage = Literal["prior", "decoder"]


def prior_steps(job: Job) -> int:
    """The Stage C steps that run: img2img runs the last ``round(steps · strength)``."""
    if job.prior is None:
        return 0
    if job.task == "img2img" and job.strength is not None and job.strength < 1:
        return round(job.prior.steps * job.strength)
    return job.prior.steps


class JobRun:
    """Runs ``job`` on ``models``, handing events to ``emit``; ``stop`` set: :class:`JobCancelled`."""

    def __init__(
        self,
        job: Job,
        record_job: Job,
        models: LoadedModels,
        model_sha256: dict[str, str],
        emit: Emit,
        stop: threading.Event,
        control: tuple[ControlRef, ControlImages] | None = None,
    ) -> None:
        self.job, self.record_job, self.models = job, record_job, models
        self.control = control
        self.model_sha256 = model_sha256
        self.emit, self.stop = emit, stop
        self.seconds = {"prior": 0.0, "decoder": 0.0}
        self._per_batch = prior_steps(job) + job.decoder.steps
        self._done = 0

    def run(self, image: PIL.Image.Image | None, previews: bool) -> None:
        job = self.job
        for batch in range(job.count):
            self.check_stop()
            first = batch * job.batch_size
            seeds = job.seeds[first : first + job.batch_size]
            generators = [torch.Generator().manual_seed(seed) for seed in seeds]
            if job.task == "reconstruct":
                assert image is not None
                images = self._reconstruct(image, generators, batch)
            else:
                handed_on = self._prior(image, generators, batch, first, previews)
                images = self._decoder(handed_on, generators, batch)
            for i, output in enumerate(images):
                record = ImageRecord(
                    job=self.record_job,
                    index=first + i,
                    seed=seeds[i],
                    width=output.width,
                    height=output.height,
                    model_sha256=self.model_sha256,
                )
                self.emit(ImageDone(first + i, output, record))

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise JobCancelled("the job was cancelled")

    def _callback(self, stage: Stage, batch: int, steps: int, preview: PreviewCallback | None) -> Any:
        counter = [0]

        def on_step(pipeline: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
            counter[0] += 1
            self._done += 1
            total = self._per_batch * self.job.count
            fraction = min(1.0, self._done / total) if total else 1.0
            self.emit(Progress(stage, min(counter[0], steps), steps, batch, self.job.count, fraction))
            if preview is not None:
                preview(pipeline, index, timestep, tensors)
            self.check_stop()
            return {}

        return on_step

    def _prior(
        self,
        image: PIL.Image.Image | None,
        generators: list[torch.Generator],
        batch: int,
        first: int,
        previews: bool,
    ) -> dict[str, Any]:
        """Stage C for every item: the outputs Stage B takes (as the combined pipeline hands them on)."""
        job, pipe = self.job, self.models.prior_pipe
        assert pipe is not None and job.prior is not None, "text-to-image tasks load the prior"
        arguments: dict[str, Any] = {"negative_prompt": job.negative_prompt or None}
        arguments.update(height=job.height, width=job.width, **job.prior.arguments(job.preset))
        if job.task == "img2img":
            arguments.update(image=image, strength=job.strength)
        elif job.task == "variation":
            arguments["images"] = [image]
        if self.control is not None:
            ref, control = self.control
            arguments.update(
                control_image=control.image,
                mask_image=control.mask,
                controlnet_conditioning_scale=ref.scale,
                control_type=ref.control_type,
            )
        preview = None
        if previews:

            def each(step: int, images: list[PIL.Image.Image]) -> None:
                for index, picture in enumerate(images):
                    self.emit(Preview(first + index, step, picture))

            preview = PreviewCallback(on_preview=each)
        arguments["callback_on_step_end"] = self._callback("prior", batch, prior_steps(job), preview)
        arguments["callback_on_step_end_tensor_inputs"] = PreviewCallback.tensor_inputs if previews else ()
        out = self._timed(
            "prior",
            pipe,
            job.prompt,
            num_images_per_prompt=len(generators),
            generator=generators,
            **arguments,
        )
        assert isinstance(out, StableCascadePriorPipelineOutput)
        return out.decoder_arguments()

    def _decoder(
        self, handed_on: dict[str, Any], generators: list[torch.Generator], batch: int
    ) -> list[PIL.Image.Image]:
        """Stage B + A; inpainting restores the control image outside the mask, as the combined pipeline."""
        job = self.job
        arguments: dict[str, Any] = {**handed_on, "height": job.height, "width": job.width}
        control = self.control[1] if self.control is not None else None
        if control is None or control.mask is None:
            images: list[PIL.Image.Image] = self._decode(
                self.models.decoder_pipe, arguments, generators, batch, job.decoder
            )
            return images
        arguments["output_type"] = "pt"
        decoded = self._decode(self.models.decoder_pipe, arguments, generators, batch, job.decoder)
        pasted = paste_unmasked(decoded, ControlRequest(control.image, control.mask), job.height, job.width)
        result = postprocess(pasted, "pil")
        assert isinstance(result, list)
        return result

    def _reconstruct(
        self, image: PIL.Image.Image, generators: list[torch.Generator], batch: int
    ) -> list[PIL.Image.Image]:
        job = self.job
        arguments: dict[str, Any] = {
            "image": image,
            "prompt": job.prompt,
            "negative_prompt": job.negative_prompt or None,
            "height": job.height,
            "width": job.width,
            "num_images_per_prompt": len(generators),
        }
        return self._decode(self.models.decoder_pipe.reconstruct, arguments, generators, batch, job.decoder)

    def _decode(
        self,
        call: Callable[..., Any],
        arguments: dict[str, Any],
        generators: list[torch.Generator],
        batch: int,
        settings: StageJob,
    ) -> Any:
        """Stage B and Stage A for every item of the batch (PIL images unless ``output_type`` says)."""
        arguments.update(settings.arguments(self.job.preset))
        arguments["callback_on_step_end"] = self._callback("decoder", batch, settings.steps, None)
        arguments["callback_on_step_end_tensor_inputs"] = ()
        return self._timed("decoder", call, generator=generators, **arguments).images

    def _timed(self, stage: Stage, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        out = call(*args, **kwargs)
        device = self.models.decoder_pipe.execution_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.seconds[stage] += time.perf_counter() - start
        return out
