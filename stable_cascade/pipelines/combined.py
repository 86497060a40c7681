"""Text → image through all three stages: the prior pipeline, then the decoder pipeline.

A drop-in for diffusers' ``StableCascadeCombinedPipeline`` (whose defaults, 512², 60 + 12 steps,
come from Würstchen v2); the requested size is passed on to the decoder, so it is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, CLIPVisionModelWithProjection

from stable_cascade.conditioning.control import MaskInput
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.diffusion.noise import Generators
from stable_cascade.diffusion.presets import COMBINED_PRESETS, get_preset
from stable_cascade.loading.bundles import PRIOR_REPO
from stable_cascade.loading.single_file import LoadOptions, combined_components
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.base import Pipeline
from stable_cascade.pipelines.callbacks import PipelineCallback
from stable_cascade.pipelines.cascade import run_cascade
from stable_cascade.pipelines.checks import check_combined_call
from stable_cascade.pipelines.control import ControlRequest
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.lora import LoraLoaderMixin
from stable_cascade.pipelines.outputs import (
    ImagePipelineOutput,
    Images,
)
from stable_cascade.pipelines.prior import ImageInput, StableCascadePriorPipeline
from stable_cascade.specs.controlnet import ControlType

if TYPE_CHECKING:  # annotation only: importing it without torchvision logs a warning
    from transformers import CLIPImageProcessor


class StableCascadeCombinedPipeline(LoraLoaderMixin, Pipeline):
    """The whole cascade; ``prior_pipe`` and ``decoder_pipe`` share this pipeline's components. LoRAs
    adapt the prior and its text encoder (those of ``prior_pipe``)."""

    diffusers_class_name = "StableCascadeCombinedPipeline"
    lora_components = ("prior_prior", "prior_text_encoder")
    optional_components = frozenset(
        {
            "prior_feature_extractor",
            "prior_image_encoder",
            "prior_effnet",
            "prior_previewer",
            "prior_controlnet",
        }
    )
    extra_components = frozenset({"prior_effnet", "prior_previewer"})
    offload_order = (
        "prior_effnet",
        "prior_controlnet",
        "prior_image_encoder",
        "prior_text_encoder",
        "prior_prior",
        "prior_previewer",
        "text_encoder",
        "decoder",
        "vqgan",
    )

    def __init__(
        self,
        tokenizer: CLIPTokenizer,
        text_encoder: CLIPTextModelWithProjection,
        decoder: StableCascadeUNet,
        scheduler: DDPMWuerstchenScheduler,
        vqgan: PaellaVQModel,
        prior_prior: StableCascadeUNet,
        prior_text_encoder: CLIPTextModelWithProjection,
        prior_tokenizer: CLIPTokenizer,
        prior_scheduler: DDPMWuerstchenScheduler,
        prior_feature_extractor: CLIPImageProcessor | None = None,
        prior_image_encoder: CLIPVisionModelWithProjection | None = None,
        prior_effnet: EfficientNetEncoder | None = None,
        prior_previewer: Previewer | None = None,
        prior_controlnet: ControlNet | None = None,
    ) -> None:
        super().__init__()
        self.register_components(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            decoder=decoder,
            scheduler=scheduler,
            vqgan=vqgan,
            prior_prior=prior_prior,
            prior_text_encoder=prior_text_encoder,
            prior_tokenizer=prior_tokenizer,
            prior_scheduler=prior_scheduler,
            prior_feature_extractor=prior_feature_extractor,
            prior_image_encoder=prior_image_encoder,
            prior_effnet=prior_effnet,
            prior_previewer=prior_previewer,
            prior_controlnet=prior_controlnet,
        )
        self.prior_pipe = StableCascadePriorPipeline(
            tokenizer=prior_tokenizer,
            text_encoder=prior_text_encoder,
            prior=prior_prior,
            scheduler=prior_scheduler,
            feature_extractor=prior_feature_extractor,
            image_encoder=prior_image_encoder,
            effnet=prior_effnet,
            previewer=prior_previewer,
            controlnet=prior_controlnet,
        )
        self.decoder_pipe = StableCascadeDecoderPipeline(
            decoder=decoder,
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            scheduler=scheduler,
            vqgan=vqgan,
            effnet=prior_effnet,
        )
        self.sub_pipelines = (self.prior_pipe, self.decoder_pipe)
        # guidance_scale and num_timesteps are the decoder's, like the pipeline its callback receives
        self._loop = self.decoder_pipe._loop

    @classmethod
    def from_single_file(
        cls,
        stage_c: str | Path,
        stage_b: str | Path,
        stage_a: str | Path | PaellaVQModel | None = None,
        *,
        effnet: str | Path | EfficientNetEncoder | None = None,
        previewer: str | Path | Previewer | None = None,
        tokenizer: CLIPTokenizer | None = None,
        text_encoder: CLIPTextModelWithProjection | None = None,
        image_encoder: CLIPVisionModelWithProjection | None = None,
        feature_extractor: CLIPImageProcessor | None = None,
        decoder_tokenizer: CLIPTokenizer | None = None,
        decoder_text_encoder: CLIPTextModelWithProjection | None = None,
        components_repo: str | Path | None = PRIOR_REPO,
        torch_dtype: torch.dtype | str | None = None,
        allow_pickle: bool = False,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> StableCascadeCombinedPipeline:
        """The cascade from Stage C and Stage B files or ComfyUI bundles (and Stage A unless the Stage B
        bundle has it); the decoder shares the prior's tokenizer and text encoder unless
        ``decoder_tokenizer`` / ``decoder_text_encoder`` are given (:mod:`.single_file`)."""
        options = LoadOptions.create(torch_dtype, allow_pickle, revision, cache_dir, local_files_only, token)
        prior_options = {
            "effnet": effnet,
            "previewer": previewer,
            "tokenizer": tokenizer,
            "text_encoder": text_encoder,
            "image_encoder": image_encoder,
            "feature_extractor": feature_extractor,
        }
        components = combined_components(
            stage_c,
            stage_b,
            stage_a,
            prior_options=prior_options,
            decoder_tokenizer=decoder_tokenizer,
            decoder_text_encoder=decoder_text_encoder,
            components_repo=components_repo,
            options=options,
        )
        return cls(**components)

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls,
        path_or_repo_id: str | Path,
        *,
        prior_path_or_repo_id: str | Path | None = None,
        subfolders: Mapping[str, str] | None = None,
        **options: Any,
    ) -> StableCascadeCombinedPipeline:
        """A combined folder (saved by us or diffusers), or a decoder repo plus a prior repo.

        ``from_pretrained("stabilityai/stable-cascade")`` takes the prior from
        ``stabilityai/stable-cascade-prior``; ``subfolders={"prior": "prior_lite", "decoder":
        "decoder_lite"}`` selects the lite UNets. Other options are those of :meth:`Pipeline.from_pretrained`.
        """
        if prior_path_or_repo_id is None and cls.describes_self(path_or_repo_id, options):
            return super().from_pretrained(path_or_repo_id, subfolders=subfolders, **options)
        subfolders = dict(subfolders or {})
        components = {k: options.pop(k) for k in list(options) if k in cls.component_names()}
        decoder_options, prior_options = _split_dtypes(options)
        decoder = StableCascadeDecoderPipeline.from_pretrained(
            path_or_repo_id,
            subfolders={k: v for k, v in subfolders.items() if k != "prior"},
            **decoder_options,
        )
        prior_components = {
            k.removeprefix("prior_"): v for k, v in components.items() if k.startswith("prior_")
        }
        prior = StableCascadePriorPipeline.from_pretrained(
            prior_path_or_repo_id or PRIOR_REPO,
            subfolders={k: v for k, v in subfolders.items() if k == "prior"},
            **prior_components,
            **prior_options,
        )
        decoder_parts = {k: v for k, v in decoder.components.items() if k != "effnet"}  # shared: prior_effnet
        parts = {**decoder_parts, **{f"prior_{k}": v for k, v in prior.components.items()}}
        parts.update({k: v for k, v in components.items() if not k.startswith("prior_")})
        pipeline = cls(**parts)
        pipeline._name_or_path = str(path_or_repo_id)
        return pipeline

    def enable_model_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        for pipeline in (self, *self.sub_pipelines):
            Pipeline.enable_model_cpu_offload(pipeline, gpu_id, device)

    def enable_sequential_cpu_offload(
        self, gpu_id: int | None = None, device: torch.device | str | None = None
    ) -> None:
        Pipeline.enable_sequential_cpu_offload(self, gpu_id, device)
        for pipeline in self.sub_pipelines:
            pipeline.use_execution_device(self.execution_device)

    def set_progress_bar_config(self, **kwargs: Any) -> None:
        for pipeline in (self, *self.sub_pipelines):
            Pipeline.set_progress_bar_config(pipeline, **kwargs)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        images: ImageInput | None = None,
        height: int = 512,
        width: int = 512,
        prior_num_inference_steps: int | None = None,
        prior_guidance_scale: float | None = None,
        num_inference_steps: int | None = None,
        decoder_guidance_scale: float | None = None,
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
        prior_callback_on_step_end: PipelineCallback | None = None,
        prior_callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        callback_on_step_end: PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        *,
        image_embeds: Tensor | None = None,
        image: ImageInput | None = None,
        strength: float = 1.0,
        preset: str = "diffusers",
        prior_sampler: str | None = None,
        sampler: str | None = None,
        prior_shift: float | None = None,
        shift: float | None = None,
        prior_guidance_rescale: float | None = None,
        guidance_rescale: float | None = None,
        control_image: ImageInput | None = None,
        mask_image: MaskInput | None = None,
        controlnet_conditioning_scale: float = 1.0,
        control_type: ControlType | None = None,
    ) -> ImagePipelineOutput | tuple[Images]:
        """Text (and optionally images) → images of exactly ``height`` × ``width``.

        Arguments and defaults are diffusers'; ``preset="reference"`` runs Stability's sampler with its
        settings (Stage C 20 steps, cfg 4, shift 2, rescale 0.7; Stage B 10 steps, cfg 1.1).
        ``image`` + ``strength`` is image-to-image (needs ``prior_effnet``), ``images`` / ``image_embeds``
        are CLIP image prompts, as in :class:`StableCascadePriorPipeline`. ``control_image``,
        ``mask_image``, ``controlnet_conditioning_scale`` and ``control_type`` drive ``prior_controlnet``
        (:mod:`stable_cascade.pipelines.control`); inpainting keeps the input image outside the mask.
        """
        check_combined_call(height, width, prior_num_inference_steps, num_inference_steps)
        stages = get_preset(preset, COMBINED_PRESETS)
        prior = {
            "prompt": prompt if prompt_embeds is None else None,
            "images": images,
            "num_inference_steps": prior_num_inference_steps or stages.prior.steps,
            "guidance_scale": _first(prior_guidance_scale, stages.prior.guidance),
            "negative_prompt": negative_prompt if negative_prompt_embeds is None else None,
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_pooled": prompt_embeds_pooled,
            "negative_prompt_embeds": negative_prompt_embeds,
            "negative_prompt_embeds_pooled": negative_prompt_embeds_pooled,
            "image_embeds": image_embeds,
            "image": image,
            "strength": strength,
            "num_images_per_prompt": num_images_per_prompt,
            "generator": generator,
            "latents": latents,
            "callback_on_step_end": prior_callback_on_step_end,
            "callback_on_step_end_tensor_inputs": prior_callback_on_step_end_tensor_inputs,
            "preset": preset,
            "sampler": prior_sampler,
            "shift": prior_shift,
            "guidance_rescale": prior_guidance_rescale,
            "control_image": control_image,
            "mask_image": mask_image,
            "controlnet_conditioning_scale": controlnet_conditioning_scale,
            "control_type": control_type,
        }
        decoder = {
            "num_inference_steps": num_inference_steps or stages.decoder.steps,
            "guidance_scale": _first(decoder_guidance_scale, stages.decoder.guidance),
            "generator": generator,
            "callback_on_step_end": callback_on_step_end,
            "callback_on_step_end_tensor_inputs": callback_on_step_end_tensor_inputs,
            "preset": preset,
            "sampler": sampler,
            "shift": shift,
            "guidance_rescale": guidance_rescale,
        }
        return run_cascade(
            self.prior_pipe,
            self.decoder_pipe,
            prior,
            decoder,
            height=height,
            width=width,
            output_type=output_type,
            paste=ControlRequest(control_image, mask_image),
            return_dict=return_dict,
        )


def _first(value: float | None, default: float) -> float:
    return default if value is None else value


def _split_dtypes(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The options for the decoder and the prior pipeline: a per-component dtype dict keyed by our
    component names (``prior_prior``, ``decoder``, ``"default"``) split by the ``prior_`` prefix."""
    decoder, prior = dict(options), dict(options)
    for key in ("torch_dtype", "dtype"):
        if isinstance(dtypes := options.get(key), Mapping):
            decoder[key] = {k: v for k, v in dtypes.items() if not k.startswith("prior_")}
            prior[key] = {
                k.removeprefix("prior_"): v
                for k, v in dtypes.items()
                if k.startswith("prior_") or k == "default"
            }
    return decoder, prior
