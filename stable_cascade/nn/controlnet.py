"""The Stage C ControlNet of Stable Cascade (original ``modules/controlnet.py``).

A backbone turns a control input (canny edges, an image plus inpainting mask, an EfficientNet
latent, ...) into features; one projection per target turns them into a residual of Stage C's
width. :meth:`ControlNet.forward` returns the original's list: entry ``k`` is the residual added
before Stage C's ``k``-th ResBlock call, or ``None`` (see ``StableCascadeUNet.forward``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from stable_cascade.checkpoint import PretrainedModel, parse_dtype
from stable_cascade.checkpoint.safetensors_io import read_single_file
from stable_cascade.convert.controlnet import controlnet_config_from_state_dict
from stable_cascade.nn.effnet import backbone as effnet_backbone
from stable_cascade.specs import EffNetConfig
from stable_cascade.specs.controlnet import ControlNetConfig

#: The original's ``CNetResBlock`` and ``large`` backbone use PyTorch's default LayerNorm eps.
LARGE_NORM_EPS = 1e-5


class ChannelLayerNorm(nn.LayerNorm):
    """Affine layer norm over the channels of an NCHW tensor (the original ControlNet's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W)
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class CNetResBlock(nn.Module):
    """``x + [norm, GELU, conv3×3] × 2`` (the ``large`` backbone's residual block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(
            ChannelLayerNorm(channels, eps=LARGE_NORM_EPS),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
            ChannelLayerNorm(channels, eps=LARGE_NORM_EPS),
            nn.GELU(),
            nn.Conv2d(channels, channels, kernel_size=3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.blocks(x)


def build_backbone(cfg: ControlNetConfig) -> nn.Sequential:
    """The backbone of ``cfg.backbone``, with the original's module tree (and so its state-dict keys)."""
    if cfg.backbone == "effnet":
        features = effnet_backbone(
            EffNetConfig(
                stage_channels=cfg.effnet_stage_channels,
                stage_depths=cfg.effnet_stage_depths,
                head_channels=cfg.embedding_channels,
            )
        )
        if cfg.in_channels != 3:
            # The original swaps the stem conv for an unpadded, bias-free one (stride 2, no padding).
            stem = nn.Conv2d(cfg.in_channels, cfg.effnet_stage_channels[0], 3, stride=2, bias=False)
            cast(nn.Sequential, features[0])[0] = stem
        return features
    if cfg.backbone == "large":
        return nn.Sequential(
            nn.Conv2d(cfg.in_channels, cfg.large_hidden_channels, kernel_size=1),
            nn.LeakyReLU(0.2),
            nn.Conv2d(cfg.large_hidden_channels, cfg.large_channels, kernel_size=1),
            *[CNetResBlock(cfg.large_channels) for _ in range(cfg.large_blocks)],
            nn.Conv2d(cfg.large_channels, cfg.embedding_channels, kernel_size=1),
        )
    c = cfg.in_channels
    return nn.Sequential(
        nn.Conv2d(c, 4 * c, kernel_size=3, padding=1),
        nn.LeakyReLU(0.2),
        nn.Conv2d(4 * c, c, kernel_size=3, padding=1),
    )


def projection(embedding_channels: int, out_channels: int) -> nn.Sequential:
    """``Conv1×1(e→e) → LeakyReLU(0.2) → Conv1×1(e→out)``, both bias-free; the last starts at zero."""
    last = nn.Conv2d(embedding_channels, out_channels, kernel_size=1, bias=False)
    nn.init.zeros_(last.weight)  # a new ControlNet adds nothing (the original's init)
    return nn.Sequential(
        nn.Conv2d(embedding_channels, embedding_channels, kernel_size=1, bias=False), nn.LeakyReLU(0.2), last
    )


class ControlNet(PretrainedModel):
    """Control input (B, in_channels, H, W) → per-ResBlock-call residuals for Stage C."""

    config_class = ControlNetConfig
    config: ControlNetConfig

    def __init__(self, config: ControlNetConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = self.resolve_config(config, kwargs)
        self.backbone = build_backbone(cfg)
        self.projections = nn.ModuleList(
            projection(cfg.embedding_channels, cfg.out_channels) for _ in cfg.proj_blocks
        )

    @property
    def num_residuals(self) -> int:
        """The length of :meth:`forward`'s list: the last target ResBlock call + 1."""
        return max(self.config.proj_blocks) + 1

    def forward(self, control: torch.Tensor) -> list[torch.Tensor | None]:
        """Residuals for Stage C's ResBlock calls: ``num_residuals`` entries, ``None`` where no projection
        targets the call; each (B, out_channels, h, w) at the backbone's resolution (the UNet resizes)."""
        if control.ndim != 4 or control.shape[1] != self.config.in_channels:
            raise ValueError(
                f"this ControlNet takes control inputs of shape (B, {self.config.in_channels}, H, W), got "
                f"{tuple(control.shape)}; preprocess the control image with "
                "stable_cascade.conditioning.control for its control type"
            )
        features = self.backbone(control.to(self.dtype))  # (B, embedding_channels, h, w)
        residuals: list[torch.Tensor | None] = [None] * self.num_residuals
        for index, project in zip(self.config.proj_blocks, self.projections, strict=True):
            residuals[index] = project(features)  # (B, out_channels, h, w)
        return residuals

    @classmethod
    def from_single_file(  # type: ignore[override]
        cls,
        path: str | Path,
        proj_blocks: Sequence[int] | None = None,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
    ) -> ControlNet:
        """Load an original ControlNet file (``controlnet/canny.safetensors``, ...).

        The backbone, input channels and widths come from the tensors; ``proj_blocks`` (the ResBlock
        calls fed, one per projection) defaults to the released ``[0, 4, 8, 12, 51, 55, 59, 63]``.
        """
        dtype = parse_dtype(torch_dtype) or torch.float32
        state_dict = read_single_file(path, allow_pickle)
        config = controlnet_config_from_state_dict(state_dict, str(path), proj_blocks)
        model = cls.from_state_dict(config, state_dict, source=str(path), dtype=dtype, copy=False)
        return model.to(device) if device is not None else model

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> ControlNetConfig:
        return controlnet_config_from_state_dict(state_dict, source)
