"""Stage B + Stage A: Stage C latents (+ text) → images.

A drop-in for diffusers' ``StableCascadeDecoderPipeline``; additionally takes the output
``height``/``width`` so that every multiple of 8 decodes to exactly that size.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.conditioning.text import check_text_arguments
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.diffusion.noise import Generators
from stable_cascade.diffusion.presets import StageSettings, stage_settings
from stable_cascade.loading.bundles import DECODER_REPO
from stable_cascade.loading.single_file import LoadOptions, decoder_components
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.base import Pipeline
from stable_cascade.pipelines.callbacks import (
    PipelineCallback,
    check_callback_inputs,
    decoder_callback_tensors,
    step_callback,
)
from stable_cascade.pipelines.checks import check_steps, check_text_widths, check_timesteps
from stable_cascade.pipelines.checks import image_embeddings as checked_image_embeddings
from stable_cascade.pipelines.lora import LoraLoaderMixin
from stable_cascade.pipelines.outputs import ImagePipelineOutput, Images, check_output_type, postprocess
from stable_cascade.pipelines.prior import ImageInput
from stable_cascade.pipelines.sizes import check_image_size, check_pixel_count, decoder_latent_size
from stable_cascade.sampling.loop import initial_latents, run_stage
from stable_cascade.sampling.phases import phase


class StableCascadeDecoderPipeline(LoraLoaderMixin, Pipeline):
    """Stage B latent diffusion followed by the Stage A decoder; LoRAs adapt ``decoder``, ``text_encoder``."""

    diffusers_class_name = "StableCascadeDecoderPipeline"
    phase_stage = "Stage B"
    lora_components = ("decoder", "text_encoder")
    optional_components = frozenset({"effnet"})
    extra_components = frozenset({"effnet"})
    offload_order = ("effnet", "text_encoder", "decoder", "vqgan")
    _callback_tensor_inputs = (
        "latents",
        "prompt_embeds_pooled",
        "negative_prompt_embeds",
        "image_embeddings",
    )
    decoder: StableCascadeUNet
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    scheduler: DDPMWuerstchenScheduler
    vqgan: PaellaVQModel
    effnet: EfficientNetEncoder | None

    def __init__(
        self,
        decoder: StableCascadeUNet,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        scheduler: DDPMWuerstchenScheduler,
        vqgan: PaellaVQModel,
        latent_dim_scale: float = 10.67,
        effnet: EfficientNetEncoder | None = None,
    ) -> None:
        super().__init__()
        self.register_components(
            decoder=decoder,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            scheduler=scheduler,
            vqgan=vqgan,
            effnet=effnet,
        )
        self.register_config(latent_dim_scale=latent_dim_scale)

    @classmethod
    def from_single_file(
        cls,
        stage_b: str | Path,
        stage_a: str | Path | PaellaVQModel | None = None,
        *,
        effnet: str | Path | EfficientNetEncoder | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder: CLIPTextModelWithProjection | None = None,
        components_repo: str | Path | None = DECODER_REPO,
        torch_dtype: torch.dtype | str | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> StableCascadeDecoderPipeline:
        """A decoder from a Stage B file or a ComfyUI Stage B bundle and Stage A (required unless the bundle
        has it); what the files lack comes from ``components_repo`` (:mod:`.single_file`)."""
        options = LoadOptions.create(torch_dtype, allow_pickle, revision, cache_dir, local_files_only, token)
        components = decoder_components(
            stage_b,
            stage_a,
            effnet=effnet,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            components_repo=components_repo,
            options=options,
        )
        return cls(**components)

    @torch.no_grad()
    def __call__(
        self,
        image_embeddings: Tensor | list[Tensor],
        prompt: str | list[str] | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        prompt_embeds_pooled: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds_pooled: Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generators | None = None,
        latents: Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        height: int | None = None,
        width: int | None = None,
        timesteps: Sequence[float] | None = None,
        preset: str | StageSettings = "diffusers",
        sampler: str | None = None,
        shift: float | None = None,
        guidance_rescale: float | None = None,
    ) -> ImagePipelineOutput | tuple[Images]:
        """Decode Stage C latents into images; ``height``/``width`` (multiples of 8) fix the output size.

        Arguments and defaults are diffusers' (10 steps, no guidance, PIL output); ``preset``,
        ``sampler``, ``shift`` and ``guidance_rescale`` select the sampler as in the prior pipeline.
        """
        check_steps("num_inference_steps", num_inference_steps)
        check_timesteps(timesteps)
        settings = stage_settings(preset, "decoder").override(
            steps=num_inference_steps,
            guidance=guidance_scale,
            timesteps=timesteps,
            sampler=sampler,
            shift=shift,
            rescale=guidance_rescale,
        )
        self._loop.guidance_scale, self._loop.num_timesteps = settings.guidance, 0
        check_output_type(output_type, ("pt", "np", "pil", "latent"))
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        image_size = self._image_size(height, width)
        effnet = checked_image_embeddings(image_embeddings, self.decoder.config.effnet_in_channels)
        batch = _prompt_batch(prompt, prompt_embeds, prompt_embeds_pooled)
        if effnet.shape[0] % batch:
            raise ValueError(
                f"image_embeddings must have a batch that is a multiple of the {batch} prompt(s); got "
                f"{tuple(effnet.shape)}"
            )
        # diffusers' rule: each prompt gets image_embeddings.shape[0] // batch rows per requested image.
        per_prompt = num_images_per_prompt * (effnet.shape[0] // batch)
        text = self.text_conditioning(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_pooled=prompt_embeds_pooled,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_pooled=negative_prompt_embeds_pooled,
            num_images_per_prompt=per_prompt,
            guidance=settings.guidance > 1,
        )
        check_text_widths(text, self.decoder.config, "decoder")
        decoder = self.activate("decoder")
        device, dtype = self.execution_device, decoder.dtype
        effnet = effnet.to(device=device, dtype=dtype).repeat_interleave(num_images_per_prompt, dim=0)
        cond = {"clip_text_pooled": text.cond.pooled, "effnet": effnet}
        uncond = None
        if text.uncond is not None:
            uncond = {"clip_text_pooled": text.uncond.pooled, "effnet": torch.zeros_like(effnet)}
        prior_size = (effnet.shape[-2], effnet.shape[-1])
        size = decoder_latent_size(prior_size, self.config.latent_dim_scale, image_size, self.vqgan.downscale)
        check_pixel_count(size[0] * self.vqgan.downscale, size[1] * self.vqgan.downscale, "the decoded image")
        x = self.prepare_latents(
            batch,
            effnet,
            per_prompt,
            dtype,
            device,
            generator,
            latents,
            self.scheduler,
            image_size=image_size,
        )
        x = run_stage(
            decoder,
            cond,
            uncond,
            x,
            settings,
            self.scheduler.config,
            generator,
            step_callback(
                self,
                callback_on_step_end,
                callback_on_step_end_tensor_inputs,
                lambda: decoder_callback_tensors(text, effnet),
            ),
            self.progress_bar,
            control=self._loop,
        )
        if output_type == "latent":
            images: Images = x
        else:
            with phase("Stage A decode"):
                decoded = self.decode_latents(x)
            with phase(f"output conversion ({output_type})"):
                images = postprocess(decoded, output_type)
        self.offload_all()
        return ImagePipelineOutput(images) if return_dict else (images,)

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        """diffusers' ``check_inputs`` (the text and callback arguments), with our messages."""
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        check_text_arguments(prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, pooled=False)

    def prepare_latents(
        self,
        batch_size: int,
        image_embeddings: Tensor,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device | str,
        generator: Generators | None,
        latents: Tensor | None,
        scheduler: DDPMWuerstchenScheduler,
        *,
        image_size: tuple[int, int] | None = None,
    ) -> Tensor:
        """diffusers' initial Stage B latents (B·n, C, h·10.67, w·10.67) for ``image_embeddings`` (…, h, w),
        rounded up to even sides (diffusers crashes on odd ones), or ``image_size / 4`` when the output
        size is known; drawn from ``generator`` as diffusers draws them, or ``latents`` checked."""
        prior_size = (image_embeddings.shape[-2], image_embeddings.shape[-1])
        size = decoder_latent_size(prior_size, self.config.latent_dim_scale, image_size, self.vqgan.downscale)
        shape = (batch_size * num_images_per_prompt, self.decoder.config.in_channels, *size)
        return (
            initial_latents(shape, latents, generator, torch.device(device), dtype)
            * scheduler.init_noise_sigma
        )

    @torch.no_grad()
    def reconstruct(
        self,
        image: ImageInput,
        prompt: str | list[str] = "",
        height: int | None = None,
        width: int | None = None,
        **call_arguments: Any,
    ) -> ImagePipelineOutput | tuple[Images]:
        """Image → EfficientNet (Stage C) latent → Stage B → Stage A: how much the cascade keeps.

        ``height``/``width`` default to the (first) image's size rounded down to multiples of 8; other
        arguments are those of :meth:`__call__` (prompt, steps, generator, output_type, …).
        """
        if self.effnet is None:
            raise ValueError(
                "reconstruct needs the EfficientNet encoder: pass effnet=EfficientNetEncoder."
                "from_single_file('effnet_encoder.safetensors') to the pipeline"
            )
        size = _output_size(image, height, width)
        effnet = self.activate("effnet")
        pixels = prepare_images(image, *effnet_input_size(*size)).to(self.execution_device, effnet.dtype)
        embeddings = effnet.encode(pixels)
        return self(embeddings, prompt, height=size[0], width=size[1], **call_arguments)

    @torch.no_grad()
    def autoencode(
        self, image: ImageInput, output_type: str = "pil", return_dict: bool = True
    ) -> ImagePipelineOutput | tuple[Images]:
        """The Stage A round trip ``decode(encode(image))`` at the image's size (multiples of 4)."""
        check_output_type(output_type, ("pt", "np", "pil"))
        multiple = self.vqgan.downscale
        size = _output_size(image, None, None, multiple)
        vqgan = self.activate("vqgan")
        pixels = prepare_images(image, *size).to(self.execution_device, vqgan.dtype)
        decoded = finite_stage_a(vqgan, vqgan.decode(vqgan.encode(pixels).latents).sample)
        images = postprocess(decoded.clamp(0, 1), output_type)
        self.offload_all()
        return ImagePipelineOutput(images) if return_dict else (images,)

    def decode_latents(self, latents: Tensor) -> Tensor:
        """Stage B latents → images (B, 3, H, W) in [0, 1] through Stage A, scaled as diffusers does."""
        vqgan = self.activate("vqgan")
        scaled = (self.vqgan.config.scale_factor * latents).to(vqgan.dtype)
        return finite_stage_a(vqgan, vqgan.decode(scaled).sample).clamp(0, 1)

    def _image_size(self, height: int | None, width: int | None) -> tuple[int, int] | None:
        if (height is None) != (width is None):
            raise ValueError("pass both height and width, or neither (then diffusers' size rule applies)")
        if height is None or width is None:
            return None
        check_image_size(height, width, minimum=self.minimum_size)
        return height, width

    @property
    def minimum_size(self) -> int:
        """The smallest image side Stage B can produce: its deepest level needs one latent pixel."""
        config = self.decoder.config
        return self.vqgan.downscale * config.patch_size * 2 ** (len(config.block_out_channels) - 1)


def finite_stage_a(vqgan: PaellaVQModel, decoded: Tensor) -> Tensor:
    """``decoded`` after checking that Stage A produced no NaN/Inf (clamping would turn them black)."""
    if not bool(torch.isfinite(decoded).all()):
        advice = (
            "run it in torch.float32"
            if vqgan.dtype != torch.float32
            else f"check its weights and its scale_factor ({vqgan.config.scale_factor})"
        )
        raise FloatingPointError(
            f"Stage A (VQGAN) decoded NaN/Inf pixels in {vqgan.dtype} on {vqgan.device.type}; {advice}"
        )
    return decoded


def _output_size(
    image: ImageInput, height: int | None, width: int | None, multiple: int = 8
) -> tuple[int, int]:
    """The requested size, or the first image's size rounded down to ``multiple``."""
    if height is not None and width is not None:
        return height, width
    first = image[0] if isinstance(image, (list, tuple)) else image
    if isinstance(first, PIL.Image.Image):
        h, w = first.height, first.width
    elif isinstance(first, Tensor):
        h, w = first.shape[-2], first.shape[-1]
    else:
        raise TypeError(f"expected a PIL image or a (3, H, W) tensor, got {type(first).__name__}")
    if h < multiple or w < multiple:
        raise ValueError(f"the image is {h}×{w}; it must be at least {multiple} pixels on each side")
    return height or h // multiple * multiple, width or w // multiple * multiple


def _prompt_batch(prompt: str | list[str] | None, embeds: Tensor | None, pooled: Tensor | None) -> int:
    if isinstance(prompt, str):
        return 1
    if isinstance(prompt, list):
        return len(prompt)
    for tensor in (embeds, pooled):
        if tensor is not None:
            return tensor.shape[0]
    raise ValueError("pass a prompt, or prompt_embeds_pooled (with prompt_embeds) from the prior pipeline")
