"""Stage C: text (and optionally images) → the 16-channel Stage C latent ("image embeddings").

A drop-in for diffusers' ``StableCascadePriorPipeline``: same components, arguments, defaults and,
for the same seed and settings, the same results.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import PIL.Image
import torch
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from stable_cascade.conditioning.image import ImagePrompt
from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.conditioning.text import check_text_arguments
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.diffusion.noise import Generators
from stable_cascade.diffusion.presets import StageSettings, stage_settings
from stable_cascade.loading.bundles import PRIOR_REPO
from stable_cascade.loading.single_file import LoadOptions, prior_components
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.layers import resize_like
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.base import Pipeline
from stable_cascade.pipelines.callbacks import (
    PipelineCallback,
    check_callback_inputs,
    prior_callback_tensors,
    step_callback,
)
from stable_cascade.pipelines.checks import (
    check_steps,
    check_text_widths,
    check_timesteps,
    per_image,
)
from stable_cascade.pipelines.control import ControlRequest, control_residuals, resolve_control_type
from stable_cascade.pipelines.image_prompts import ImageArguments, image_conditioning
from stable_cascade.pipelines.ip_adapter import IPAdapterMixin
from stable_cascade.pipelines.lora import LoraLoaderMixin
from stable_cascade.pipelines.outputs import StableCascadePriorPipelineOutput, as_numpy_if, check_output_type
from stable_cascade.pipelines.sizes import check_image_size, prior_latent_size
from stable_cascade.sampling.loop import initial_latents, run_stage
from stable_cascade.sampling.phases import phase
from stable_cascade.specs.controlnet import ControlType

if TYPE_CHECKING:  # annotation only: importing it without torchvision logs a warning
    from transformers import CLIPImageProcessor

ImageInput = PIL.Image.Image | Tensor | Sequence[PIL.Image.Image | Tensor]
#: Image prompts: images, or :class:`ImagePrompt` (an image and its strength), one or a list.
ImagePrompts = ImageInput | ImagePrompt | Sequence[PIL.Image.Image | Tensor | ImagePrompt]


class StableCascadePriorPipeline(IPAdapterMixin, LoraLoaderMixin, Pipeline):
    """Stage C text-to-latent (and image variation) pipeline; LoRAs adapt ``prior`` and ``text_encoder``,
    IP-Adapters attach to ``prior``."""

    diffusers_class_name = "StableCascadePriorPipeline"
    phase_stage = "Stage C"
    optional_components = frozenset(
        {"feature_extractor", "image_encoder", "effnet", "previewer", "controlnet"}
    )
    extra_components = frozenset({"effnet", "previewer", "controlnet"})
    offload_order = ("effnet", "controlnet", "image_encoder", "text_encoder", "prior", "previewer")
    _callback_tensor_inputs = ("latents", "denoised", "text_encoder_hidden_states", "negative_prompt_embeds")
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    prior: StableCascadeUNet
    scheduler: DDPMWuerstchenScheduler
    feature_extractor: CLIPImageProcessor | None
    image_encoder: CLIPVisionModelWithProjection | None
    effnet: EfficientNetEncoder | None
    previewer: Previewer | None
    controlnet: ControlNet | None

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        prior: StableCascadeUNet,
        scheduler: DDPMWuerstchenScheduler,
        resolution_multiple: float = 42.67,
        feature_extractor: CLIPImageProcessor | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        effnet: EfficientNetEncoder | None = None,
        previewer: Previewer | None = None,
        controlnet: ControlNet | None = None,
    ) -> None:
        super().__init__()
        self.register_components(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            prior=prior,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
            effnet=effnet,
            previewer=previewer,
            controlnet=controlnet,
        )
        self.register_config(resolution_multiple=resolution_multiple)

    @classmethod
    def from_single_file(
        cls,
        stage_c: str | Path,
        *,
        effnet: str | Path | EfficientNetEncoder | None = None,
        previewer: str | Path | Previewer | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder: CLIPTextModelWithProjection | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        components_repo: str | Path | None = PRIOR_REPO,
        torch_dtype: torch.dtype | str | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> StableCascadePriorPipeline:
        """A prior from a Stage C file (full, lite, bf16, fine-tune) or a ComfyUI Stage C bundle; what the
        file lacks comes from ``components_repo`` (see :mod:`stable_cascade.loading.single_file`)."""
        options = LoadOptions.create(torch_dtype, allow_pickle, revision, cache_dir, local_files_only, token)
        components = prior_components(
            stage_c,
            effnet=effnet,
            previewer=previewer,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
            components_repo=components_repo,
            options=options,
        )
        return cls(**components)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images: ImagePrompts | None = None,
        height: int = 1024,
        width: int = 1024,
        num_inference_steps: int | None = None,
        timesteps: Sequence[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        prompt_embeds_pooled: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds_pooled: Tensor | None = None,
        image_embeds: Tensor | None = None,
        num_images_per_prompt: int = 1,
        generator: Generators | None = None,
        latents: Tensor | None = None,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        image: ImageInput | None = None,
        strength: float = 1.0,
        preset: str | StageSettings = "diffusers",
        sampler: str | None = None,
        shift: float | None = None,
        guidance_rescale: float | None = None,
        control_image: ImageInput | None = None,
        mask_image: PIL.Image.Image | Tensor | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_type: ControlType | None = None,
        negative_images: ImagePrompts | None = None,
        negative_image_embeds: Tensor | None = None,
    ) -> StableCascadePriorPipelineOutput | tuple[Any, ...]:
        """Generate Stage C latents (B·num_images_per_prompt, 16, ⌈H/42.67⌉, ⌈W/42.67⌉).

        Arguments and defaults are diffusers'; ``None`` step counts and guidance come from ``preset``
        (``"diffusers"``: 20 steps, guidance 4; ``"reference"``: Stability's sampler). ``sampler``,
        ``shift`` and ``guidance_rescale`` override the preset.

        Image-to-image: ``image`` is encoded by the EfficientNet encoder (``effnet``) at 3/4 of the
        output size, noised to the time of ``strength`` and sampled for the last
        ``round(steps · strength)`` steps (the reference: strength 0.8, 16 of 20 steps). ``images``
        are CLIP image prompts (variation), as in diffusers; an :class:`ImagePrompt` among them carries
        a strength, and ``negative_images`` / ``negative_image_embeds`` prompt the unconditional branch
        (see :mod:`stable_cascade.pipelines.image_prompts`). Attached IP-Adapters read them too.

        ControlNet (``controlnet`` component): ``control_image`` (an image, or a preprocessed control
        tensor), ``mask_image`` for inpainting (white = generate), ``controlnet_conditioning_scale``
        and ``control_type`` (default: the ControlNet's own); see :mod:`stable_cascade.pipelines.control`.
        """
        check_steps("num_inference_steps", num_inference_steps)
        check_timesteps(timesteps)
        settings = stage_settings(preset, "prior").override(
            steps=num_inference_steps,
            guidance=guidance_scale,
            timesteps=timesteps,
            sampler=sampler,
            shift=shift,
            rescale=guidance_rescale,
        )
        self._loop.guidance_scale, self._loop.num_timesteps = settings.guidance, 0
        check_image_size(height, width)
        check_output_type(output_type, ("pt", "np", "latent"))  # "latent": tensors, as "pt"
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        text = self.text_conditioning(
            prompt=prompt,
            negative_prompt=negative_prompt,
            prompt_embeds=prompt_embeds,
            prompt_embeds_pooled=prompt_embeds_pooled,
            negative_prompt_embeds=negative_prompt_embeds,
            negative_prompt_embeds_pooled=negative_prompt_embeds_pooled,
            num_images_per_prompt=num_images_per_prompt,
            guidance=settings.guidance > 1,
        )
        check_text_widths(text, self.prior.config, "prior")
        given = ImageArguments(images, image_embeds, negative_images, negative_image_embeds)
        prompted = image_conditioning(self, given, text.batch_size, num_images_per_prompt)
        prior = self.activate("prior")
        device, dtype = self.execution_device, prior.dtype
        cond = {"clip_text": text.cond.hidden, "clip_text_pooled": text.cond.pooled}
        uncond = None
        if text.uncond is not None:
            uncond = {"clip_text": text.uncond.hidden, "clip_text_pooled": text.uncond.pooled}
        for branch, clip_img, ip_image in (
            (cond, prompted.clip_img, prompted.ip_image),
            (uncond, prompted.negative_clip_img, prompted.negative_ip_image),
        ):
            if branch is not None and clip_img is not None:
                branch["clip_img"] = clip_img
            if branch is not None and ip_image is not None:
                branch["ip_image"] = ip_image
        x = self.prepare_latents(
            text.batch_size,
            height,
            width,
            num_images_per_prompt,
            dtype,
            device,
            generator,
            latents,
            self.scheduler,
        )
        shape = tuple(x.shape)
        init = None
        if image is not None:
            init = self._init_latents(
                image, strength, (height, width), shape, text.batch_size, num_images_per_prompt
            )
        request = ControlRequest(control_image, mask_image, controlnet_conditioning_scale, control_type)
        residuals = self._control(request, height, width, text.batch_size, num_images_per_prompt)
        x = run_stage(
            prior,
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
                lambda: prior_callback_tensors(text),
            ),
            self.progress_bar,
            init=init,
            strength=strength,
            control=self._loop,
            residuals=residuals,
        )
        self.offload_all()
        numpy = output_type == "np"
        with phase(f"Stage C output conversion ({output_type})"):
            outputs = (
                as_numpy_if(x, numpy),
                as_numpy_if(text.cond.hidden, numpy),
                text.cond.pooled,
                as_numpy_if(text.uncond.hidden if text.uncond is not None else None, numpy),
                text.uncond.pooled if text.uncond is not None else None,
            )
        return StableCascadePriorPipelineOutput(*outputs) if return_dict else outputs  # type: ignore[arg-type]

    def check_inputs(
        self,
        prompt: str | list[str] | None,
        images: ImagePrompts | None = None,
        image_embeds: Tensor | None = None,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: Tensor | None = None,
        prompt_embeds_pooled: Tensor | None = None,
        negative_prompt_embeds: Tensor | None = None,
        negative_prompt_embeds_pooled: Tensor | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] | None = None,
    ) -> None:
        """diffusers' ``check_inputs`` (the text, image and callback arguments), with our messages."""
        check_callback_inputs(callback_on_step_end_tensor_inputs, self._callback_tensor_inputs)
        text = (prompt_embeds, negative_prompt_embeds, prompt_embeds_pooled, negative_prompt_embeds_pooled)
        check_text_arguments(prompt, negative_prompt, *text)
        ImageArguments(images, image_embeds).check()

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        num_images_per_prompt: int,
        dtype: torch.dtype,
        device: torch.device | str,
        generator: Generators | None,
        latents: Tensor | None,
        scheduler: DDPMWuerstchenScheduler,
    ) -> Tensor:
        """diffusers' initial Stage C latents (B·n, C, ⌈H/42.67⌉, ⌈W/42.67⌉): drawn from ``generator``
        as diffusers draws them, or ``latents`` after a shape check; times ``init_noise_sigma``."""
        size = prior_latent_size(height, width, self.config.resolution_multiple)
        shape = (batch_size * num_images_per_prompt, self.prior.config.in_channels, *size)
        return (
            initial_latents(shape, latents, generator, torch.device(device), dtype)
            * scheduler.init_noise_sigma
        )

    def _control(
        self, request: ControlRequest, height: int, width: int, batch_size: int, per_prompt: int
    ) -> list[Tensor | None] | None:
        """The ControlNet residuals for this call, one row per generated image (None without control)."""
        if self.controlnet is None:
            if request.image is not None or request.mask is not None:
                raise ValueError(
                    "control_image needs a ControlNet: pass controlnet=ControlNet.from_single_file(...) "
                    "to the pipeline"
                )
            return None
        wants_effnet = resolve_control_type(self.controlnet, request.control_type) == "super_resolution"
        effnet = self.activate("effnet") if wants_effnet and self.effnet is not None else None
        result = control_residuals(
            self.activate("controlnet"), request, height, width, effnet, self.execution_device
        )
        if result is None:
            return None
        rows = [
            None if r is None else per_image(r, batch_size, per_prompt, "control_image") for r in result[0]
        ]
        return [None if r is None else r.to(self.prior.dtype) for r in rows]

    def _init_latents(
        self,
        image: ImageInput,
        strength: float,
        size: tuple[int, int],
        shape: tuple[int, ...],
        batch_size: int,
        per_prompt: int,
    ) -> Tensor:
        """The clean Stage C latent of ``image`` (one row per generated image) for image-to-image."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1] (1: ignore the image, 0: keep it), got {strength}")
        if self.effnet is None:
            raise ValueError(
                "image-to-image needs the EfficientNet encoder: pass effnet=EfficientNetEncoder."
                "from_single_file('effnet_encoder.safetensors') to the pipeline"
            )
        effnet = self.activate("effnet")
        pixels = prepare_images(image, *effnet_input_size(*size))
        latent = effnet.encode(pixels.to(self.execution_device, effnet.dtype))  # (N, 16, h', w')
        latent = resize_like(latent, (shape[-2], shape[-1])).to(self.prior.dtype)
        return per_image(latent, batch_size, per_prompt, "image")
