"""Sample images during training, with the current (EMA) weights, as one PNG row per call.

* ``stage-c`` / ``lora`` / ``controlnet``: the prior pipeline on the sample prompts (default: captions
  of the first images), through the one cascade run with the decoder pipeline given as ``--decoder``
  (a pipeline folder) when there is one, else previewed (the previewer's RGB, or the latent's principal
  components);
* ``stage-b``: reconstructions of the first images (EfficientNet latent → Stage B → Stage A);
* ``stage-a``: the first images and their Stage A round trips, interleaved;
* ``previewer``: the first images and their previews (nearest-neighbour enlarged), interleaved;
* ``lcm``: as its stage (``stage-c`` or ``stage-b``), with the student and the ``lcm`` preset.

Sampling runs with its own seeded generator inside ``torch.random.fork_rng``: it changes no random
state of training, so runs with and without samples train identically.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, cast

import PIL.Image
import torch
from torch import Tensor
from torch.nn import functional as F

from stable_cascade.checkpoint.atomic import atomic_path
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.loading.components import MODEL_INDEX
from stable_cascade.pipelines.cascade import run_cascade
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.outputs import postprocess
from stable_cascade.pipelines.previews import latent_to_rgb
from stable_cascade.pipelines.prior import StableCascadePriorPipeline
from stable_cascade.training.data import Batch
from stable_cascade.training.ema import EMA
from stable_cascade.training.tasks import Task

logger = logging.getLogger(__name__)


class Sampler:
    """Writes ``samples/step-<step>.png`` under the output folder for a task."""

    def __init__(self, task: Task, reference: Batch, seed: int) -> None:
        self.task, self.reference, self.seed = task, reference, seed
        self.folder = task.config.output_dir / "samples"
        self._decoder: StableCascadeDecoderPipeline | None = None
        decoder = task.config.decoder
        self.kind = f"stage-{task.config.lcm_stage}" if task.config.task == "lcm" else task.config.task
        self.preset = "lcm" if task.config.task == "lcm" else "diffusers"
        if self.kind in ("stage-c", "lora", "controlnet") and decoder is not None:
            if not (decoder / MODEL_INDEX).is_file():
                raise ValueError(
                    f"--decoder {decoder}: samples of {task.name} need a decoder pipeline folder"
                )
            self._decoder = StableCascadeDecoderPipeline.from_pretrained(decoder)

    @torch.no_grad()
    def __call__(self, step: int, ema: EMA | None) -> Path:
        trainee = self.task.trainee
        swap = ema.swapped_in(trainee) if ema is not None else contextlib.nullcontext()
        was_training = trainee.training
        trainee.eval()
        try:
            with swap, torch.random.fork_rng(devices=_cuda_devices()):
                images = self._images(torch.Generator().manual_seed(self.seed))
        finally:
            trainee.train(was_training)
        row = torch.cat(list(images.float().cpu().clamp(0, 1)), dim=-1)[None]  # (1, 3, H, n·W)
        image = cast(list[PIL.Image.Image], postprocess(row, "pil"))[0]
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"step-{step:06d}.png"
        with atomic_path(path) as temporary:
            image.save(temporary, format="PNG")
        logger.info("wrote %s", path)
        return path

    def _images(self, generator: torch.Generator) -> Tensor:
        task, parts = self.task, self.task.parts
        images = self.reference.images.to(task.device)
        height, width = images.shape[-2:]
        trainee: Any = task.trainee
        if self.kind == "stage-a":
            vqgan = trainee.vqgan
            decoded = vqgan.decode(vqgan.encode(images).latents).sample
            return torch.stack([images, decoded.to(images.dtype)], dim=1).flatten(0, 1)
        if self.kind == "previewer":
            latents = task.prepare(self.reference, generator)["latents"]
            previews = F.interpolate(trainee.previewer.preview(latents), size=(height, width), mode="nearest")
            return torch.stack([images, previews.to(images.dtype)], dim=1).flatten(0, 1)
        text_encoder: Any = parts.text_encoder
        if self.kind == "stage-b":
            pipeline = StableCascadeDecoderPipeline(
                decoder=trainee.unet,
                tokenizer=parts.tokenizer,
                text_encoder=text_encoder,
                scheduler=DDPMWuerstchenScheduler(),
                vqgan=cast(Any, parts.stage_a),
                effnet=parts.effnet,
            )
            pipeline.set_progress_bar_config(disable=True)
            captions = self.reference.captions
            out = pipeline.reconstruct(
                images, captions, height, width, generator=generator, output_type="pt", preset=self.preset
            )
            return cast(Tensor, out[0])
        prompts = list(task.config.sample_prompts) or self.reference.captions
        controlnet = getattr(trainee, "controlnet", None)
        prior = StableCascadePriorPipeline(
            tokenizer=parts.tokenizer,
            text_encoder=text_encoder,
            prior=trainee.unet,
            scheduler=DDPMWuerstchenScheduler(),
            previewer=parts.previewer,
            controlnet=controlnet,
        )
        prior.set_progress_bar_config(disable=True)
        control = {}
        if controlnet is not None:  # the first image's control for every prompt
            control = {"control_image": task.control(images[:1], generator)}  # type: ignore[attr-defined]
        if self._decoder is None:
            generated = prior(
                prompts,
                height=height,
                width=width,
                generator=generator,
                output_type="pt",
                preset=self.preset,
                **control,
            )
            return latent_to_rgb(cast(Tensor, generated[0]), parts.previewer)  # image_embeddings
        self._decoder.to(task.device)
        self._decoder.set_progress_bar_config(disable=True)
        arguments = {"prompt": prompts, "generator": generator, "preset": self.preset, **control}
        decoded = run_cascade(
            prior,
            self._decoder,
            arguments,
            {"generator": generator},
            height=height,
            width=width,
            output_type="pt",
        )
        return cast(Tensor, decoded[0])


def _cuda_devices() -> list[int]:
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
