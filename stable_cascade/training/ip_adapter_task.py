"""The ``ip-adapter`` task: an IP-Adapter for a frozen Stage C, trained on Stage C's objective (``stage-c``).

As Ye et al. train IP-Adapters: x0 = the EfficientNet latent of the image; CLIP text of the caption with
``caption_dropout`` (5 %) dropped to ``""``; the CLIP image embedding of the image prompt (the image itself
unless the data names another, see :mod:`~stable_cascade.training.data`; with ``ip_adapter_patches``:
the image encoder's penultimate hidden states, for a resampler) is the adapter's input, zeroed for
``ip_adapter_image_dropout`` (5 %) of the samples, so that guidance has an unconditional image. The
prior's own CLIP image tokens get the zero embedding, as when the pipelines run the adapter (see
:mod:`stable_cascade.pipelines.image_prompts`). The prior, the text and image encoders and the
EfficientNet encoder are frozen (the prior in eval mode); only the adapter trains, fresh from
:func:`~stable_cascade.nn.ip_adapter.new_ip_adapter` (``ip_adapter_tokens`` tokens per image). The
export is one file, ``<output_dir>/final/ip_adapter.safetensors`` (the EMA weights when the EMA is on),
with the key groups ``image_proj.*`` and ``ip_adapter.*``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.lora.ip_adapter import save_ip_adapter
from stable_cascade.nn.ip_adapter import IPAdapter, new_ip_adapter
from stable_cascade.nn.unet import StableCascadeUNet, StableCascadeUNetOutput
from stable_cascade.training.components import Components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.data import Batch
from stable_cascade.training.objective import diffuse, epsilon_loss, keep
from stable_cascade.training.tasks import Inputs, TextConditioned
from stable_cascade.training.trainees import Outputs, rebuild

IP_ADAPTER_FILE = "ip_adapter.safetensors"
TRAINING = "training"  # the name the trained adapter is attached under


class IPDenoiser(nn.Module):
    """The frozen prior with the trained adapter attached; forward → per-sample ε loss (as ``Denoiser``)."""

    def __init__(self, unet: StableCascadeUNet, adapter: IPAdapter) -> None:
        super().__init__()
        self.unet, self.adapter = unet, adapter
        unet.ip_adapters[TRAINING] = (adapter, 1.0)  # the same module: its weights train

    def train(self, mode: bool = True) -> IPDenoiser:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout
        return self

    def forward(self, sample: Tensor, noise: Tensor, logsnr: Tensor, r: Tensor, **cond: Tensor) -> Outputs:
        out = self.unet(sample, r, **cond)
        assert isinstance(out, StableCascadeUNetOutput)
        return {"loss": epsilon_loss(out.sample, noise), "logsnr": logsnr}


class IPAdapterStageC(TextConditioned):
    name = "ip-adapter"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        hint = "pass --pretrained PIPELINE (a prior pipeline with its image_encoder and feature_extractor)"
        super().__init__(config, parts, "prior", hint)
        if parts.image_encoder is None or parts.feature_extractor is None:
            raise ValueError(
                "ip-adapter needs the CLIP image encoder and its feature extractor (not given); " + hint
            )
        self.unet.eval().requires_grad_(False)
        self.image_encoder = parts.image_encoder.eval().requires_grad_(False)
        vision = self.image_encoder.config
        width = vision.hidden_size if config.ip_adapter_patches else vision.projection_dim
        self.adapter = new_ip_adapter(
            self.unet,
            width,
            num_tokens=config.ip_adapter_tokens,
            input="patches" if config.ip_adapter_patches else "embeds",
            seed=config.seed,
        ).requires_grad_(True)
        self.trainee = IPDenoiser(self.unet, self.adapter).train()

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        pixels = prepare_images(images, *effnet_input_size(*images.shape[-2:]))
        noised = diffuse(self.effnet.encode(pixels).float(), generator)  # x0: (B, 16, ⌈H/42.67⌉, …)
        inputs = {"sample": noised.sample, "noise": noised.noise, "logsnr": noised.logsnr, "r": noised.r}
        inputs.update(self._text(batch.captions, generator, trained=False))
        inputs["ip_image"] = self.image_input(batch.prompts, generator)
        return inputs

    def image_input(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The adapter's input for (B, 3, H, W) image prompts in [0, 1]: (B, 1, C) embeddings or
        (B, 1, P, C) patch tokens, zero for ``ip_adapter_image_dropout`` of them."""
        processor = self.parts.feature_extractor
        pixels = processor(list(images.cpu()), do_rescale=False, return_tensors="pt").pixel_values
        patches = self.config.ip_adapter_patches
        out = self.image_encoder(
            pixels.to(self.device, self.image_encoder.dtype), output_hidden_states=patches
        )
        found = (out.hidden_states[-2] if patches else out.image_embeds).float()[:, None]  # (B, 1, …)
        kept = keep(images.shape[0], 1.0 - self.config.ip_adapter_image_dropout, generator).to(self.device)
        return found * kept.view(-1, *(1,) * (found.ndim - 1))

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        adapter = rebuild(self.adapter, state, "adapter.")
        metadata = {"task": "stage-c ip-adapter", "steps": str(self.config.steps)}
        save_ip_adapter(directory / IP_ADAPTER_FILE, adapter, metadata)
