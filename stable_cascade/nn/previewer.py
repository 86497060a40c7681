"""The latent previewer: Stage C latents → a small RGB image (×8), for progress previews.

Matches the original Stable Cascade ``Previewer`` (``previewer.safetensors``): one ``blocks``
Sequential of convs, GELUs and BatchNorms (default eps 1e-5) whose indices are the checkpoint keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.pretrained import PretrainedModel
from stable_cascade.specs import PreviewerConfig

_FIRST, _LAST = "blocks.0.weight", "blocks.24.weight"  # the first and the final 1×1 conv


def _stage(conv: nn.Module, channels: int) -> list[nn.Module]:
    """conv → GELU → BatchNorm (the original's order: the norm comes after the activation)."""
    return [conv, nn.GELU(), nn.BatchNorm2d(channels)]


class Previewer(PretrainedModel):
    """Latents (B, c_in, h, w) → RGB (B, c_out, 8h, 8w), as the original ``Previewer``."""

    config_class = PreviewerConfig
    config: PreviewerConfig

    def __init__(self, config: PreviewerConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = self.resolve_config(config, kwargs)
        c_in, c, c_out = self.config.c_in, self.config.c_hidden, self.config.c_out
        half, quarter = c // 2, c // 4
        self.blocks = nn.Sequential(
            *_stage(nn.Conv2d(c_in, c, kernel_size=1), c),
            *_stage(nn.Conv2d(c, c, kernel_size=3, padding=1), c),
            *_stage(nn.ConvTranspose2d(c, half, kernel_size=2, stride=2), half),  # ×2
            *_stage(nn.Conv2d(half, half, kernel_size=3, padding=1), half),
            *_stage(nn.ConvTranspose2d(half, quarter, kernel_size=2, stride=2), quarter),  # ×4
            *_stage(nn.Conv2d(quarter, quarter, kernel_size=3, padding=1), quarter),
            *_stage(nn.ConvTranspose2d(quarter, quarter, kernel_size=2, stride=2), quarter),  # ×8
            *_stage(nn.Conv2d(quarter, quarter, kernel_size=3, padding=1), quarter),
            nn.Conv2d(quarter, c_out, kernel_size=1),
        )

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> PreviewerConfig:
        """The widths of a checkpoint: the first conv's input and output channels, the last conv's output."""
        if _FIRST not in state_dict or _LAST not in state_dict:
            raise CheckpointError(f"{source} is not a previewer: it lacks {_FIRST} or {_LAST}")
        c_hidden, c_in = state_dict[_FIRST].shape[:2]
        return PreviewerConfig(c_in=c_in, c_hidden=c_hidden, c_out=state_dict[_LAST].shape[0])

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        """The raw network output (B, c_out, 8h, 8w), as the original returns it: an image only
        approximately in [0, 1] (values slightly outside occur). :meth:`preview` clamps it."""
        c = self.config.c_in
        if latent.ndim != 4 or latent.shape[1] != c:
            raise ValueError(
                f"expected latents of shape (B, {c}, h, w), got a tensor of shape {tuple(latent.shape)}"
            )
        return self.blocks(latent)

    def preview(self, latent: torch.Tensor) -> torch.Tensor:
        """RGB previews (B, c_out, 8h, 8w) clamped to [0, 1]."""
        return self(latent).clamp(0.0, 1.0)
