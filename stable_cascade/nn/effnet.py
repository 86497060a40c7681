"""The EfficientNetV2-S image encoder that gives Stage B (and Stage C training) its ``effnet`` input.

Matches the original Stable Cascade ``EfficientNetEncoder``: ``backbone`` is torchvision's
``efficientnet_v2_s().features`` (same module tree, state-dict keys, shapes and eval numerics, built
here without torchvision), ``mapper`` a bias-free 1×1 conv to ``c_latent`` channels followed by a
non-affine BatchNorm. Deliberate difference: torchvision's stochastic depth (a training-time
regulariser, the identity in eval) is not implemented, so training-mode outputs differ; the encoder
is frozen in Stable Cascade. Parameters keep PyTorch's default init: real weights come from a
checkpoint (``from_single_file("effnet_encoder.safetensors")``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
from torch import nn

from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.pretrained import PretrainedModel
from stable_cascade.specs import EffNetConfig

#: torchvision's EfficientNetV2 uses ``BatchNorm2d(eps=1e-3)``.
BN_EPS = 1e-3
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

BlockKind = Literal["fused", "mbconv"]
#: (block kind, expand ratio, stride of the first block) per stage; every kernel is 3×3.
STAGES: tuple[tuple[BlockKind, int, int], ...] = (
    ("fused", 1, 1),
    ("fused", 4, 2),
    ("fused", 4, 2),
    ("mbconv", 4, 2),
    ("mbconv", 6, 1),
    ("mbconv", 6, 2),
)


def conv_bn(
    c_in: int, c_out: int, kernel: int, stride: int = 1, groups: int = 1, activation: bool = True
) -> nn.Sequential:
    """torchvision's ``Conv2dNormActivation``: bias-free conv (``0``), BatchNorm (``1``), SiLU (``2``)."""
    conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False)
    layers: list[nn.Module] = [conv, nn.BatchNorm2d(c_out, eps=BN_EPS)]
    if activation:
        layers.append(nn.SiLU())
    return nn.Sequential(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision's ``SqueezeExcitation`` with SiLU: ``x · sigmoid(fc2(silu(fc1(mean_hw(x)))))``."""

    def __init__(self, channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze_channels, kernel_size=1)
        self.fc2 = nn.Conv2d(squeeze_channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        scale = x.mean(dim=(-2, -1), keepdim=True)  # (B, C, 1, 1)
        scale = torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(scale))))
        return x * scale


class FusedMBConv(nn.Module):
    """Fused inverted residual: a full 3×3 expand conv + 1×1 projection (one 3×3 conv for expand 1)."""

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        if expand == 1:
            self.block = nn.Sequential(conv_bn(c_in, c_out, 3, stride))
        else:
            hidden = c_in * expand
            self.block = nn.Sequential(
                conv_bn(c_in, hidden, 3, stride), conv_bn(hidden, c_out, 1, activation=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


class MBConv(nn.Module):
    """Inverted residual: 1×1 expand, depthwise 3×3, squeeze-excitation, 1×1 projection (no activation).

    EfficientNetV2 only uses expand ratios 4 and 6 here (torchvision drops the expand conv for 1).
    """

    def __init__(self, c_in: int, c_out: int, expand: int, stride: int) -> None:
        super().__init__()
        self.residual = stride == 1 and c_in == c_out
        hidden = c_in * expand
        self.block = nn.Sequential(
            conv_bn(c_in, hidden, 1),
            conv_bn(hidden, hidden, 3, stride, groups=hidden),
            # The squeeze width follows the block's *input* channels, as in torchvision.
            SqueezeExcitation(hidden, max(1, c_in // 4)),
            conv_bn(hidden, c_out, 1, activation=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return out + x if self.residual else out


def backbone(config: EffNetConfig) -> nn.Sequential:
    """``efficientnet_v2_s().features``: stem (``0``), six stages (``1``–``6``), head (``7``); stride 32."""
    c_stem = config.stage_channels[0]
    layers: list[nn.Module] = [conv_bn(3, c_stem, 3, stride=2)]
    c_in = c_stem
    for (kind, expand, stride), c_out, depth in zip(
        STAGES, config.stage_channels, config.stage_depths, strict=True
    ):
        block = FusedMBConv if kind == "fused" else MBConv
        # The first block of a stage changes width and stride; the others keep both.
        blocks = [
            block(c_in if i == 0 else c_out, c_out, expand, stride if i == 0 else 1) for i in range(depth)
        ]
        layers.append(nn.Sequential(*blocks))
        c_in = c_out
    layers.append(conv_bn(c_in, config.head_channels, 1))
    return nn.Sequential(*layers)


class EfficientNetEncoder(PretrainedModel):
    """Images → Stage B's ``effnet`` latents (B, c_latent, H/32, W/32), as the original encoder."""

    config_class = EffNetConfig
    config: EffNetConfig

    def __init__(self, config: EffNetConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = self.resolve_config(config, kwargs)
        cfg = self.config
        self.backbone = backbone(cfg)
        self.mapper = nn.Sequential(
            nn.Conv2d(cfg.head_channels, cfg.c_latent, kernel_size=1, bias=False),
            # Non-affine, default eps 1e-5: whitens the latents with the stored running statistics.
            nn.BatchNorm2d(cfg.c_latent, affine=False),
        )

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> EffNetConfig:
        """The widths and depths of a checkpoint, read off its keys: a stage's width is the input width
        of the next module (the first conv of the next stage, or the head conv ``backbone.7``)."""
        following = [
            *(f"backbone.{stage}.0.block.0.0.weight" for stage in range(2, 7)),
            "backbone.7.0.weight",
        ]
        try:
            depths = tuple(_blocks(state_dict, f"backbone.{stage}.") for stage in range(1, 7))
            widths = tuple(state_dict[key].shape[1] for key in following)  # conv weights (out, in, k, k)
            head, c_latent = (
                state_dict["backbone.7.0.weight"].shape[0],
                state_dict["mapper.0.weight"].shape[0],
            )
        except KeyError as error:
            raise CheckpointError(f"{source} is not an EfficientNet encoder: it lacks {error}") from error
        return EffNetConfig(c_latent=c_latent, stage_channels=widths, stage_depths=depths, head_channels=head)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet-normalised images (B, 3, H, W) → (B, c_latent, ⌈H/32⌉, ⌈W/32⌉).

        This is the original ``forward``; use :meth:`encode` for images in [0, 1].
        """
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected images of shape (B, 3, H, W), got a tensor of shape {tuple(x.shape)}")
        features = self.backbone(x)  # (B, head_channels, H/32, W/32)
        return self.mapper(features)  # (B, c_latent, H/32, W/32)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] → latents, after the ImageNet normalisation of the original
        ``effnet_preprocess``. The images are cast to the encoder's dtype (a new tensor)."""
        images = images.to(dtype=self.dtype)
        mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
        return self((images - mean) / std)


def _blocks(state_dict: Mapping[str, torch.Tensor], prefix: str) -> int:
    """How many blocks ``prefix<i>.`` a checkpoint has."""
    blocks = {k.removeprefix(prefix).split(".")[0] for k in state_dict if k.startswith(prefix)}
    if not blocks:
        raise KeyError(f"{prefix}*")
    return len(blocks)
