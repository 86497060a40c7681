"""ControlNet guidance for Stage C: control inputs → residuals for the sampling loop.

The residuals are step-invariant: the ControlNet runs once per generation, its outputs are scaled
by ``controlnet_conditioning_scale`` and fed to both guidance branches (the original's ``cnet`` and
``cnet_uncond``). A scale of 0 skips the ControlNet entirely (exactly the plain result).

Sizes: ``canny`` and ``inpainting`` control images (and masks) are fitted to the output size;
``super_resolution`` images to half of it, so the result is twice the input's size (the original
notebook encodes a 1024² image and samples 2048²). Inpainting results keep the input image outside
the mask (:func:`paste_unmasked`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from stable_cascade.conditioning.control import (
    SUPER_RESOLUTION_FACTOR,
    MaskInput,
    control_input,
    prepare_mask,
)
from stable_cascade.conditioning.pixels import ImageInput, prepare_images
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.specs.controlnet import ControlType

CONTROL_TYPES: tuple[ControlType, ...] = ("canny", "inpainting", "super_resolution")


@dataclass(frozen=True)
class ControlRequest:
    """What a pipeline call asked of its ControlNet."""

    image: ImageInput | None
    mask: MaskInput | None = None
    scale: float = 1.0
    control_type: ControlType | None = None


def resolve_control_type(controlnet: ControlNet, requested: ControlType | None) -> ControlType:
    """``requested``, or the type recorded with the ControlNet; a clear error when neither is known."""
    known = controlnet.config.control_type
    if requested is not None and requested not in CONTROL_TYPES:
        raise ValueError(f"control_type must be one of {', '.join(CONTROL_TYPES)}, got {requested!r}")
    if requested is not None and known is not None and requested != known:
        raise ValueError(
            f"this ControlNet was made for {known!r} control, not {requested!r}; omit control_type "
            "or load the matching ControlNet"
        )
    if requested is None and known is None:
        raise ValueError(
            "cannot tell which control this ControlNet expects; pass control_type="
            f"{' | '.join(repr(t) for t in CONTROL_TYPES)}"
        )
    return requested or known  # type: ignore[return-value]


def control_size(control_type: ControlType, height: int, width: int) -> tuple[int, int]:
    """The size the control image is fitted to for an output of ``height``×``width``."""
    if control_type != "super_resolution":
        return height, width
    if height % SUPER_RESOLUTION_FACTOR or width % SUPER_RESOLUTION_FACTOR:
        raise ValueError(
            f"super-resolution doubles the input: height and width must be even, got {height}x{width}"
        )
    return height // SUPER_RESOLUTION_FACTOR, width // SUPER_RESOLUTION_FACTOR


def control_residuals(
    controlnet: ControlNet,
    request: ControlRequest,
    height: int,
    width: int,
    effnet: EfficientNetEncoder | None,
    device: torch.device,
) -> tuple[list[Tensor | None], ControlType] | None:
    """The scaled residuals (one row per control image) and the control type; None for scale 0."""
    if request.image is None:
        raise ValueError("a ControlNet needs control_image (the image, edges, or a preprocessed control)")
    control_type = resolve_control_type(controlnet, request.control_type)
    if request.mask is not None and control_type != "inpainting":
        raise ValueError(f"mask_image is for inpainting ControlNets; this one takes {control_type!r} control")
    if request.scale == 0:
        return None
    image = request.image
    channels = controlnet.config.in_channels
    if isinstance(image, Tensor) and image.ndim == 4 and image.shape[1] == channels != 3:
        control = image.detach()  # already preprocessed (e.g. edges or a latent)
    else:
        encode = None
        if effnet is not None:
            encoder = effnet

            def encode(pixels: Tensor) -> Tensor:
                return encoder.encode(pixels.to(device, encoder.dtype))

        control = control_input(
            control_type, image, *control_size(control_type, height, width), request.mask, encode
        )
        if controlnet.config.backbone == "simple":  # no downsampling: control on the 1/32 grid
            control = F.adaptive_avg_pool2d(control, (-(-height // 32), -(-width // 32)))
    residuals = controlnet(control.to(device, controlnet.dtype))
    return [None if r is None else r * request.scale for r in residuals], control_type


def paste_unmasked(images: Tensor, request: ControlRequest, height: int, width: int) -> Tensor:
    """Decoded (B, 3, H, W) images with the input image restored where the mask is False."""
    if request.mask is None or request.image is None:
        return images
    source = prepare_images(request.image, height, width).to(images.device, images.dtype)
    keep = ~prepare_mask(request.mask, height, width).to(images.device)
    return torch.where(keep, source, images)
