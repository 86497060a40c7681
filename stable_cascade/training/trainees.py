"""The modules a training step runs with gradients: the trained model(s) and the per-sample loss.

A trainee's ``forward(**inputs)`` returns ``{"loss": (B,), "logsnr": (B,)}`` (Stage A and the
previewer: no ``logsnr``):
one module, so that DDP and FSDP wrap everything that trains, encoders trained jointly included.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import CLIPTextModelWithProjection

from stable_cascade.checkpoint import PretrainedModel
from stable_cascade.conditioning.text import embed_tokens
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import DecoderOutput, PaellaVQModel, VQEncoderOutput
from stable_cascade.nn.unet import StableCascadeUNet, StableCascadeUNetOutput
from stable_cascade.training.config import ReconstructionLoss
from stable_cascade.training.objective import epsilon_loss

Outputs = dict[str, Tensor]


class Denoiser(nn.Module):
    """Stage C / Stage B: the UNet and the encoders trained with it; forward → per-sample ε loss.

    Inputs: ``sample`` x_t, ``noise`` ε, ``logsnr`` and ``r`` (B,), and the UNet's conditioning; a
    trained text encoder gets ``input_ids``/``attention_mask`` instead of ``clip_text*``, a trained
    EfficientNet encoder ``effnet_images``/``effnet_keep`` (1 or 0 per sample) instead of ``effnet``.
    """

    text_encoder: CLIPTextModelWithProjection
    effnet: EfficientNetEncoder

    def __init__(
        self,
        unet: StableCascadeUNet,
        text_encoder: CLIPTextModelWithProjection | None = None,
        effnet: EfficientNetEncoder | None = None,
    ) -> None:
        super().__init__()
        self.unet = unet
        if text_encoder is not None:
            self.text_encoder = text_encoder
        if effnet is not None:
            self.effnet = effnet

    def forward(self, sample: Tensor, noise: Tensor, logsnr: Tensor, r: Tensor, **cond: Tensor) -> Outputs:
        if "input_ids" in cond:
            text = embed_tokens(self.text_encoder, cond.pop("input_ids"), cond.pop("attention_mask"))
            cond["clip_text_pooled"] = text.pooled
            if self.unet.config.clip_text_in_channels is not None:
                cond["clip_text"] = text.hidden
        if "effnet_images" in cond:  # every sample is encoded (DDP needs every parameter used)
            kept = cond.pop("effnet_keep").view(-1, 1, 1, 1)
            cond["effnet"] = self.effnet.encode(cond.pop("effnet_images")) * kept
        out = self.unet(sample, r, **cond)
        assert isinstance(out, StableCascadeUNetOutput)
        return {"loss": epsilon_loss(out.sample, noise), "logsnr": logsnr}


class Autoencoder(nn.Module):
    """Stage A: encode → nearest codebook entry (straight-through) → decode.

    Per-sample loss = reconstruction (MSE or L1) + codebook loss ‖q − sg(z)‖² + 0.25 · commitment
    ‖sg(q) − z‖², the ``VectorQuantize`` losses of the original Stage A. The original also trained
    with perceptual and adversarial losses (its ``Discriminator``); they are not reproduced here.
    """

    def __init__(self, vqgan: PaellaVQModel, reconstruction: ReconstructionLoss = "mse") -> None:
        super().__init__()
        self.vqgan, self.reconstruction = vqgan, reconstruction

    def forward(self, images: Tensor) -> Outputs:
        latents = encode_latents(self.vqgan, images)  # (B, 4, H/4, W/4)
        quantized = self.vqgan.quantize(latents)
        codebook = (quantized.float() - latents.detach().float()).pow(2).flatten(1).mean(1)
        commitment = (quantized.detach().float() - latents.float()).pow(2).flatten(1).mean(1)
        straight_through = latents + (quantized - latents).detach()
        error = decode_latents(self.vqgan, straight_through).float() - images.float()
        distance = error.abs() if self.reconstruction == "l1" else error.pow(2)
        return {"loss": distance.flatten(1).mean(1) + codebook + 0.25 * commitment}


class PreviewFit(nn.Module):
    """The previewer: EfficientNet latents (B, 16, h, w) → RGB (B, 3, 8h, 8w); per-sample MSE to the
    image resized to that size (``target``, in [0, 1]). The raw output is compared, unclamped, so that
    the loss keeps its gradient where the network overshoots [0, 1]."""

    def __init__(self, previewer: Previewer) -> None:
        super().__init__()
        self.previewer = previewer

    def forward(self, latents: Tensor, target: Tensor) -> Outputs:
        error = self.previewer(latents).float() - target.float()
        return {"loss": error.pow(2).flatten(1).mean(1)}


def encode_latents(vqgan: PaellaVQModel, images: Tensor) -> Tensor:
    out = vqgan.encode(images)
    assert isinstance(out, VQEncoderOutput)
    return out.latents


def decode_latents(vqgan: PaellaVQModel, latents: Tensor) -> Tensor:
    out = vqgan.decode(latents)
    assert isinstance(out, DecoderOutput)
    return out.sample


def rebuild(module: Any, state: dict[str, Tensor], prefix: str) -> Any:
    """A new copy of ``module`` holding the tensors of ``state`` under ``prefix`` (built on the meta
    device, so no second random init); works from full state dicts, also when training sharded."""
    own = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if isinstance(module, PretrainedModel):
        return type(module).from_state_dict(module.config, own, source="training state")
    with torch.device("meta"):
        copy = type(module)(module.config)
    copy.load_state_dict(own, strict=True, assign=True)
    for name, buffer in module.named_buffers():  # non-persistent buffers are not in a state dict
        owner, _, leaf = name.rpartition(".")
        target = copy.get_submodule(owner)
        if getattr(target, leaf).is_meta:
            target.register_buffer(leaf, buffer.detach().clone(), persistent=False)
    return copy.eval()
