"""The ``controlnet`` task: a Stage C ControlNet trained against a frozen Stage C (``train_c_controlnet.py``).

The prior, the text encoder and the EfficientNet encoder are frozen (the prior in eval mode); the
ControlNet trains with Stage C's objective: x0 = the EfficientNet latent of the image, CLIP text
with 5 % caption dropout, and the residuals of the ControlNet on the image's control input added to
the prior. Control inputs (``controlnet_type``), as the original filters make them:

* ``canny``: ``CannyFilter`` edges (effnet backbone, 1 channel);
* ``inpainting``: the image with a masked region set to 1.0, plus the mask (effnet backbone, 4
  channels). The original draws masks from a saliency model it ships as a pickle; here the masked
  region is a random rectangle (25–75 % of each side), inverted (outpainting) for 40 % of the samples;
* ``super_resolution``: ``SREffnetFilter``, the EfficientNet latent of the image at half size,
  upsampled ×2 (nearest) (large backbone, 16 channels);
* ``simple``: canny edges average-pooled to the EfficientNet latent grid (1/32), for the ``simple``
  backbone, which does not downsample (the pipelines pool its control the same way).

A new ControlNet has the released layout sized to the prior (its width; the effnet backbone as the
EfficientNet encoder, whose weights it starts from, as the original starts from ImageNet weights;
the stem takes the first input channels, zeros beyond three), zero-initialised output projections,
and targets ``controlnet_blocks`` (default: the released targets when the prior has 64 ResBlock
calls, else every call up to 8). The export is the ControlNet folder (``ControlNet.from_pretrained``).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stable_cascade.conditioning.control import canny_edges, inpainting_control, super_resolution_control
from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.unet import StableCascadeUNet, StableCascadeUNetOutput
from stable_cascade.nn.unet_state import resblock_widths
from stable_cascade.specs.controlnet import RELEASED_PROJ_BLOCKS, ControlNetConfig
from stable_cascade.training.components import Components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.data import Batch
from stable_cascade.training.objective import diffuse, epsilon_loss, keep, uniform
from stable_cascade.training.tasks import Inputs, TextConditioned
from stable_cascade.training.trainees import Outputs, rebuild

OUTPAINT_SHARE = 0.4  # the original InpaintFilter's p_outpaint


class ControlledDenoiser(nn.Module):
    """The frozen prior with a trained ControlNet; forward → per-sample ε loss (as ``Denoiser``)."""

    def __init__(self, unet: StableCascadeUNet, controlnet: ControlNet) -> None:
        super().__init__()
        self.unet, self.controlnet = unet, controlnet

    def train(self, mode: bool = True) -> ControlledDenoiser:
        super().train(mode)
        self.unet.eval()  # frozen: no dropout
        if self.controlnet.config.backbone == "effnet":
            self.controlnet.backbone.eval()  # its batch norms keep their statistics
        return self

    def forward(self, sample: Tensor, noise: Tensor, logsnr: Tensor, r: Tensor, **cond: Tensor) -> Outputs:
        residuals = self.controlnet(cond.pop("control"))
        out = self.unet(sample, r, controlnet_residuals=residuals, **cond)
        assert isinstance(out, StableCascadeUNetOutput)
        return {"loss": epsilon_loss(out.sample, noise), "logsnr": logsnr}


def default_blocks(unet: StableCascadeUNet) -> tuple[int, ...]:
    calls = len(resblock_widths(unet.config))
    return RELEASED_PROJ_BLOCKS if calls == 64 else tuple(range(min(calls, 8)))


class ControlNetStageC(TextConditioned):
    name = "controlnet"

    def __init__(self, config: TrainConfig, parts: Components) -> None:
        hint = "pass --pretrained PIPELINE, or --prior, --effnet and --text-encoder"
        super().__init__(config, parts, "prior", hint)
        self.unet.eval().requires_grad_(False)
        self.controlnet = self._new_controlnet().requires_grad_(True)
        self.trainee = ControlledDenoiser(self.unet, self.controlnet).train()

    def _new_controlnet(self) -> ControlNet:
        kind, effnet, width = (
            self.config.controlnet_type,
            self.effnet.config,
            self.unet.config.block_out_channels[0],
        )
        blocks = self.config.controlnet_blocks or default_blocks(self.unet)
        cfg = ControlNetConfig(out_channels=width, proj_blocks=blocks)
        if kind in ("canny", "inpainting"):
            cfg = cfg.replace(
                in_channels=1 if kind == "canny" else 4,
                embedding_channels=effnet.head_channels,
                effnet_stage_channels=effnet.stage_channels,
                effnet_stage_depths=effnet.stage_depths,
                control_type=kind,
            )
        elif kind == "super_resolution":
            cfg = cfg.replace(backbone="large", in_channels=effnet.c_latent, control_type=kind)
            if width != 2048:  # the released sizes fit the 3.6B Stage C; scale them with the width
                cfg = cfg.replace(large_hidden_channels=8 * width, large_channels=max(8, width // 2))
        else:
            cfg = cfg.replace(backbone="simple", in_channels=1, embedding_channels=1, control_type="canny")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            controlnet = ControlNet(cfg)
        if cfg.backbone == "effnet":
            _init_from_encoder(controlnet, self.effnet.backbone)
        return controlnet

    @torch.no_grad()
    def prepare(self, batch: Batch, generator: torch.Generator) -> Inputs:
        images = batch.images.to(self.device)
        pixels = prepare_images(images, *effnet_input_size(*images.shape[-2:]))
        noised = diffuse(self.effnet.encode(pixels).float(), generator)
        inputs = {"sample": noised.sample, "noise": noised.noise, "logsnr": noised.logsnr, "r": noised.r}
        inputs.update(self._text(batch.captions, generator, trained=False))
        inputs["control"] = self.control(images, generator)
        return inputs

    def control(self, images: Tensor, generator: torch.Generator) -> Tensor:
        """The control input of (B, 3, H, W) images for this task's ``controlnet_type``."""
        kind = self.config.controlnet_type
        if kind == "canny":
            return canny_edges(images)
        if kind == "simple":
            height, width = images.shape[-2:]
            return F.adaptive_avg_pool2d(canny_edges(images), (-(-height // 32), -(-width // 32)))
        if kind == "super_resolution":
            half = F.interpolate(images, scale_factor=0.5, mode="nearest")
            return super_resolution_control(half, self.effnet.encode)
        return inpainting_control(images, random_masks(images, generator))

    def export(self, directory: Path, state: dict[str, Tensor]) -> None:
        rebuild(self.controlnet, state, "controlnet.").save_pretrained(directory)


def random_masks(images: Tensor, generator: torch.Generator) -> Tensor:
    """Bool (B, 1, H, W): a random rectangle per image (True = generate), inverted for 40 %."""
    b, _, h, w = images.shape
    sizes = 0.25 + 0.5 * uniform((b, 2), generator)  # of each side
    corners = uniform((b, 2), generator) * (1 - sizes)
    inverted = keep(b, OUTPAINT_SHARE, generator)
    rows = torch.arange(h).view(1, h, 1) / h
    cols = torch.arange(w).view(1, 1, w) / w
    top, left = corners[:, 0].view(b, 1, 1), corners[:, 1].view(b, 1, 1)
    in_rows = (rows >= top) & (rows < top + sizes[:, 0].view(b, 1, 1))  # (B, H, 1)
    inside = in_rows & (cols >= left) & (cols < left + sizes[:, 1].view(b, 1, 1))  # (B, H, W)
    return (inside ^ inverted.view(b, 1, 1))[:, None].to(images.device)


@torch.no_grad()
def _init_from_encoder(controlnet: ControlNet, backbone: nn.Module) -> None:
    """Start the effnet backbone from the EfficientNet encoder's (the original: ImageNet weights)."""
    source = backbone.state_dict()
    for name, tensor in controlnet.backbone.state_dict().items():
        given = source[name]
        if name == "0.0.weight" and given.shape != tensor.shape:  # the stem of a c ≠ 3 input
            tensor.zero_()
            shared = min(tensor.shape[1], given.shape[1])
            tensor[:, :shared] = given[:, :shared]
        else:
            tensor.copy_(given)
