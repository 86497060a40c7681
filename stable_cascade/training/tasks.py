"""Per-stage training tasks: what is trained, what stays frozen, a batch's inputs, the export.

A task owns a *trainee* (:mod:`~stable_cascade.training.trainees`), the module holding every trained
model; ``prepare`` turns a batch into the trainee's inputs with the frozen encoders, under ``no_grad``,
drawing every random choice from the given generator. One training loop (``trainer.py``) serves all.

* ``stage-c`` (``train_c.py``): x0 = the frozen EfficientNet encoder's latent of the image at
  ``effnet_input_size`` (so its size is the prior pipeline's ``⌈H/42.67⌉``); conditioning: CLIP text
  (``clip_text`` = last hidden state, ``clip_text_pooled`` = text_embeds) of the caption, dropped to ``""``
  for 5 %; the image's CLIP image embedding for 10 % (else zeros). ``train_text_encoder`` trains the text
  encoder jointly.
* ``stage-b`` (``train_b.py``): x0 = frozen Stage A's latent / ``scale_factor`` (the decoder pipeline
  multiplies it back before decoding); pyramid noise (``pyramid_noise_max_side``); ``effnet`` =
  EfficientNet latent of the image at a random 50–100 % (``effnet_scale``) of its size (multiple of 32),
  zeroed for 10 %; pooled CLIP text with 5 % caption
  dropout; ``pixels`` zeros as at inference (the 8×8 image for ``pixels_conditioning`` of the samples).
  ``train_effnet`` trains the encoder jointly (needed when there is no pretrained one).
* ``stage-a``: the VQGAN as an autoencoder (:class:`~stable_cascade.training.trainees.Autoencoder`).
* ``previewer``: the latent previewer (:class:`~stable_cascade.training.trainees.PreviewFit`): input =
  the frozen EfficientNet encoder's latent of the image at ``effnet_input_size`` (what Stage C learns to
  generate), target = the image resized to 8× the latent's size, the preview's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import CLIPTextModelWithProjection

from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.conditioning.text import embed_tokens, tokenize
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.prior import StableCascadePriorPipeline
from stable_cascade.training.components import Components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.data import Batch
from stable_cascade.training.ema import EMA
from stable_cascade.training.objective import diffuse, drop_captions, keep, pyramid_noise, uniform
from stable_cascade.training.trainees import Autoencoder, Denoiser, PreviewFit, encode_latents, rebuild

Inputs = dict[str, Tensor]


class Task:
    """Base: the trainee, the size rule for images, the frozen modules' device, the export."""

    name = ""
    trainee: nn.Module

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        self.config, self.parts = config, parts
        self.device = torch.device("cpu")

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this (the EfficientNet encoder's stride)."""
        return 32

    def to(self, device: torch.device) -> None:
        """Move the frozen modules (the accelerator moves the trainee)."""
        self.device = device
        for name in ("effnet", "stage_a", "text_encoder", "image_encoder", "previewer"):
            module = getattr(self.parts, name)
            if isinstance(module, nn.Module) and not any(m is module for m in self.trainee.modules()):
                module.to(device)

    def begin(self, ema: EMA | None) -> None:
        """Called once before the first step with the run's EMA of the trainee (None without one)."""

    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        raise NotImplementedError

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        """Write the trained model(s), with the trainee weights ``state``, to ``directory``."""
        raise NotImplementedError


class TextConditioned(Task):
    """Stage C and Stage B: a UNet conditioned on CLIP text, with caption dropout."""

    tokenizer: Any
    text_encoder: CLIPTextModelWithProjection
    effnet: EfficientNetEncoder

    def __init__(self, config: TrainConfig, parts: Components, unet: str, hint: str) -> None:
        super().__init__(config, parts)
        _require(parts, config.task, (unet, "effnet", "tokenizer", "text_encoder"), hint)
        assert parts.effnet is not None and parts.text_encoder is not None
        self.unet: StableCascadeUNet = getattr(parts, unet)
        self.tokenizer, self.text_encoder, self.effnet = parts.tokenizer, parts.text_encoder, parts.effnet
        width = self.text_encoder.config.projection_dim
        _check_width(self.unet, width, "clip_text_pooled_in_channels", "the text encoder")
        self.effnet.eval().requires_grad_(False)
        self.text_encoder.eval().requires_grad_(False)

    def _text(self, captions: list[str], generator: torch.Generator, trained: bool) -> Inputs:
        """CLIP text inputs of the captions after caption dropout (tokens when the encoder trains)."""
        captions = drop_captions(captions, self.config.caption_dropout, generator)
        ids, mask = (t.to(self.device) for t in tokenize(self.tokenizer, captions))
        if trained:
            return {"input_ids": ids, "attention_mask": mask}
        text = embed_tokens(self.text_encoder, ids, mask)
        return {"clip_text": text.hidden, "clip_text_pooled": text.pooled}

    def latents(self, images: Tensor) -> Tensor:
        """x0 of (B, 3, H, W) images: the latents the stage generates, in float32."""
        raise NotImplementedError

    def conditioning(self, batch: Batch, images: Tensor, generator: torch.Generator) -> Inputs:
        """The UNet's conditioning of a batch (after condition dropout)."""
        raise NotImplementedError

    @torch.no_grad()
    def unconditional(self, cond: Inputs) -> Inputs:
        """The unconditional branch of ``cond`` (classifier-free guidance): the empty caption's text, zeros
        for every other input (the CLIP image embedding, Stage B's EfficientNet latent and pixels)."""
        count = next(iter(cond.values())).shape[0]
        ids, mask = (t.to(self.device) for t in tokenize(self.tokenizer, [""] * count))
        text = embed_tokens(self.text_encoder, ids, mask)
        empty = {"clip_text": text.hidden, "clip_text_pooled": text.pooled}
        return {key: empty[key] if key in empty else torch.zeros_like(value) for key, value in cond.items()}


class StageC(TextConditioned):
    name = "stage-c"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        hint = "pass --pretrained PIPELINE, or --prior (or --init-config), --effnet and --text-encoder"
        super().__init__(config, parts, "prior", hint)
        _check_width(self.unet, self.effnet.config.c_latent, "in_channels", "the EfficientNet latent")
        self.trained_text = self._make_trainable()
        self.trainee = Denoiser(self.unet, self.text_encoder if self.trained_text else None).train()
        self.image_width = self.unet.config.clip_image_in_channels
        self.image_conditioning = parts.image_encoder is not None and parts.feature_extractor is not None

    def _make_trainable(self) -> bool:
        """Unfreeze what is trained; whether the text encoder is part of it."""
        self.unet.requires_grad_(True)
        if self.config.train_text_encoder:
            self.text_encoder.requires_grad_(True)
        return self.config.train_text_encoder

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        noised = diffuse(self.latents(images), generator)
        inputs = {"sample": noised.sample, "noise": noised.noise, "logsnr": noised.logsnr, "r": noised.r}
        inputs.update(self.conditioning(batch, images, generator))
        return inputs

    def latents(self, images: Tensor) -> Tensor:
        pixels = prepare_images(images, *effnet_input_size(*images.shape[-2:]))
        return self.effnet.encode(pixels).float()  # (B, 16, ⌈H/42.67⌉, ⌈W/42.67⌉)

    def conditioning(self, batch: Batch, images: Tensor, generator: torch.Generator) -> Inputs:
        inputs = self._text(batch.captions, generator, self.trained_text)
        if self.image_width is not None and self.image_conditioning:
            inputs["clip_img"] = self._image_embeddings(batch, self.image_width, generator)
        return inputs

    def _image_embeddings(self, batch: Batch, width: int, generator: torch.Generator) -> Tensor:
        """(B, 1, C): the CLIP image embedding of each sample's image prompt for the samples whose example
        names one and for ``image_conditioning`` of the others (of their own image), else zeros."""
        count = batch.images.shape[0]
        chosen = keep(count, self.config.image_conditioning, generator) | batch.prompted
        embeddings = torch.zeros(count, 1, width, device=self.device)
        if chosen.any():
            processor, encoder = self.parts.feature_extractor, self.parts.image_encoder
            pixels = processor(list(batch.prompts[chosen]), do_rescale=False, return_tensors="pt")
            out = encoder(pixels.pixel_values.to(self.device, encoder.dtype)).image_embeds  # (k, C)
            embeddings[chosen.to(self.device)] = out[:, None].float()
        return embeddings

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        text_encoder = rebuild(self.text_encoder, state, "text_encoder.") if self.trained_text else None
        self.pipeline(rebuild(self.unet, state, "unet."), text_encoder).save_pretrained(directory)

    def pipeline(
        self, unet: StableCascadeUNet, text_encoder: CLIPTextModelWithProjection | None = None
    ) -> StableCascadePriorPipeline:
        """The prior pipeline of ``unet`` with this task's encoders (``text_encoder``: a trained one)."""
        parts = self.parts
        return StableCascadePriorPipeline(
            tokenizer=self.tokenizer,
            text_encoder=text_encoder or self.text_encoder,
            prior=unet,
            scheduler=DDPMWuerstchenScheduler(),
            feature_extractor=parts.feature_extractor,
            image_encoder=parts.image_encoder,
            effnet=self.effnet,
            previewer=parts.previewer,
        )


class StageB(TextConditioned):
    name = "stage-b"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        hint = (
            "pass --pretrained PIPELINE, or --decoder (or --init-config), --stage-a, --text-encoder and "
            "--effnet (a fresh one from a config .json with --train-effnet)"
        )
        _require(parts, config.task, ("stage_a",), hint)
        super().__init__(config, parts, "decoder", hint)
        assert parts.stage_a is not None
        self.vqgan: PaellaVQModel = parts.stage_a.eval().requires_grad_(False)
        latent = self.effnet.config.c_latent
        _check_width(self.unet, latent, "effnet_in_channels", "the EfficientNet latent")
        _check_width(self.unet, self.vqgan.config.latent_channels, "in_channels", "the Stage A latent")
        self.unet.requires_grad_(True)
        if config.train_effnet:
            self.effnet.train().requires_grad_(True)
        if config.train_text_encoder:  # learns from the pooled embedding alone (the demo cascade's)
            self.text_encoder.requires_grad_(True)
        self.trainee = Denoiser(
            self.unet,
            self.text_encoder if config.train_text_encoder else None,
            effnet=self.effnet if config.train_effnet else None,
        ).train()

    @property
    def size_multiple(self) -> int:
        """Stage A's factor × patch size × 2 per level below the first: the decoder's smallest image."""
        cfg = self.unet.config
        return max(32, self.vqgan.downscale * cfg.patch_size * 2 ** (len(cfg.block_out_channels) - 1))

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        x0 = self.latents(images)
        side = self.config.pyramid_noise_max_side
        noised = diffuse(x0, generator, pyramid_noise(tuple(x0.shape), generator, side) if side else None)
        inputs = {"sample": noised.sample, "noise": noised.noise, "logsnr": noised.logsnr, "r": noised.r}
        inputs.update(self.conditioning(batch, images, generator))
        return inputs

    def latents(self, images: Tensor) -> Tensor:
        return encode_latents(self.vqgan, images).float() / self.vqgan.config.scale_factor  # (B, 4, H/4, W/4)

    def conditioning(self, batch: Batch, images: Tensor, generator: torch.Generator) -> Inputs:
        text = self._text(batch.captions, generator, trained=self.config.train_text_encoder)
        inputs = {k: v for k, v in text.items() if k != "clip_text"}  # Stage B: pooled text only
        low, high = self.config.effnet_scale
        factor = low + (high - low) * float(uniform((1,), generator))
        small = prepare_images(images, *(max(32, int(s * factor // 32 * 32)) for s in images.shape[-2:]))
        kept = keep(images.shape[0], 1.0 - self.config.effnet_dropout, generator).to(self.device)
        if self.config.train_effnet:
            inputs.update(effnet_images=small, effnet_keep=kept.to(small.dtype))
        else:
            inputs["effnet"] = self.effnet.encode(small) * kept.view(-1, 1, 1, 1)
        if self.unet.config.pixel_mapper_in_channels is not None:
            shown = keep(images.shape[0], self.config.pixels_conditioning, generator).to(self.device)
            inputs["pixels"] = F.adaptive_avg_pool2d(images, 8) * shown.view(-1, 1, 1, 1)
        return inputs

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        config = self.config
        text_encoder = (
            rebuild(self.text_encoder, state, "text_encoder.") if config.train_text_encoder else None
        )
        effnet = rebuild(self.effnet, state, "effnet.") if config.train_effnet else None
        self.pipeline(rebuild(self.unet, state, "unet."), text_encoder, effnet).save_pretrained(directory)

    def pipeline(
        self,
        unet: StableCascadeUNet,
        text_encoder: CLIPTextModelWithProjection | None = None,
        effnet: EfficientNetEncoder | None = None,
    ) -> StableCascadeDecoderPipeline:
        """The decoder pipeline of ``unet`` with this task's encoders and Stage A (or trained ones)."""
        return StableCascadeDecoderPipeline(
            decoder=unet,
            tokenizer=self.tokenizer,
            text_encoder=text_encoder or self.text_encoder,
            scheduler=DDPMWuerstchenScheduler(),
            vqgan=self.vqgan,
            effnet=effnet or self.effnet,
        )


class StageA(Task):
    name = "stage-a"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        super().__init__(config, parts)
        hint = "pass --stage-a, --pretrained PIPELINE or --init-config tiny_vqgan|vqgan"
        _require(parts, config.task, ("stage_a",), hint)
        assert parts.stage_a is not None
        self.vqgan = parts.stage_a.requires_grad_(True)
        self.trainee = Autoencoder(self.vqgan, config.reconstruction_loss).train()

    @property
    def size_multiple(self) -> int:
        return self.vqgan.downscale

    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        return {"images": batch.images.to(self.device)}

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        rebuild(self.vqgan, state, "vqgan.").save_pretrained(directory)


class PreviewerTask(Task):
    name = "previewer"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        super().__init__(config, parts)
        hint = (
            "pass --effnet (or --pretrained PIPELINE) and --init-config demo_previewer|previewer (a fresh "
            "previewer) or --previewer FILE"
        )
        _require(parts, config.task, ("effnet", "previewer"), hint)
        assert parts.effnet is not None and parts.previewer is not None
        self.effnet: EfficientNetEncoder = parts.effnet.eval().requires_grad_(False)
        self.previewer: Previewer = parts.previewer.requires_grad_(True)
        latent, c_in = self.effnet.config.c_latent, self.previewer.config.c_in
        if latent != c_in:
            raise ValueError(
                f"the previewer's c_in is {c_in} but the EfficientNet latent has {latent} channels; use "
                "matching models (or a previewer config whose c_in fits)"
            )
        self.trainee = PreviewFit(self.previewer).train()

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        pixels = prepare_images(images, *effnet_input_size(*images.shape[-2:]))
        latents = self.effnet.encode(pixels).float()  # (B, 16, ⌈H/42.67⌉, ⌈W/42.67⌉)
        height, width = (8 * side for side in latents.shape[-2:])
        return {"latents": latents, "target": prepare_images(images, height, width)}  # (B, 3, 8h, 8w)

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        rebuild(self.previewer, state, "previewer.").save_pretrained(directory)


def _require(parts: Components, task: str, names: tuple[str, ...], hint: str) -> None:
    missing = [n for n in names if getattr(parts, n) is None]
    if missing:
        raise ValueError(f"{task} needs {', '.join(missing)} (not given); {hint}")


def _check_width(unet: StableCascadeUNet, given: int | None, field: str, what: str) -> None:
    expected = getattr(unet.config, field)
    if given != expected:
        raise ValueError(
            f"the UNet's {field} is {expected} but {what} has {given} channels; use matching models "
            "(or a config whose widths fit)"
        )
