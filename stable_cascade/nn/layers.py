"""The building blocks of the Stage B / Stage C UNet (spec section 2).

Module and parameter names follow the diffusers layout so that its state dicts load unchanged.
Every level block has the signature ``block(x, cond)`` where ``cond`` is the per-call
:class:`BlockConditioning`; the first ResBlock of an up level also takes the skip tensor.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class BlockConditioning(NamedTuple):
    """What every level block may read besides ``x``."""

    timestep: torch.Tensor  # (B, 64 * (1 + n_conds)) timestep-ratio embeddings
    clip: torch.Tensor  # (B, L, c_cond) normalised CLIP tokens


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-affine layer norm over the channels of an NCHW tensor."""
    return F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], eps=eps).permute(0, 3, 1, 2)


class LayerNorm2d(nn.Module):
    """:func:`layer_norm_2d` as a module (for ``nn.Sequential`` positions in the checkpoint layout)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm_2d(x)


def resize_like(x: torch.Tensor, size: torch.Size | tuple[int, int]) -> torch.Tensor:
    """Bilinear resize with ``align_corners=True``, computed in float32 as the original does."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x.float(), size=size, mode="bilinear", align_corners=True).to(x.dtype)


def timestep_embedding(r: torch.Tensor, dim: int, max_positions: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of a timestep ratio ``r`` in [0, 1]: ``(B,) -> (B, dim)``, sin half first."""
    half = dim // 2
    freqs = torch.exp(
        torch.arange(half, device=r.device, dtype=torch.float32) * (-math.log(max_positions) / (half - 1))
    )
    angles = (r * max_positions)[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb.to(r.dtype)


class GlobalResponseNorm(nn.Module):
    """ConvNeXt-V2 GRN over an NHWC tensor: ``gamma * (x * n) + beta + x``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)  # (B, 1, 1, C)
        n = g / (g.mean(dim=-1, keepdim=True) + 1e-6)
        return self.gamma * (x * n) + self.beta + x


class ResBlock(nn.Module):
    """Depthwise conv, channel layer norm, optional skip concat, then a GRN channel MLP; residual."""

    def __init__(self, c: int, c_skip: int = 0, kernel_size: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(c, c, kernel_size, padding=kernel_size // 2, groups=c)
        self.channelwise = nn.Sequential(
            nn.Linear(c + c_skip, c * 4),
            nn.GELU(),
            GlobalResponseNorm(c * 4),
            nn.Dropout(dropout),
            nn.Linear(c * 4, c),
        )

    def forward(
        self, x: torch.Tensor, cond: BlockConditioning | None = None, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C)
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6)
        if skip is not None:
            h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)  # (B, H, W, C + C_skip)
        return x + self.channelwise(h).permute(0, 3, 1, 2)


class TimestepBlock(nn.Module):
    """Affine modulation ``x * (1 + a) + b`` from the timestep embedding and each extra condition."""

    def __init__(self, c: int, c_timestep: int, conds: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.conds = conds
        self.mapper = nn.Linear(c_timestep, c * 2)
        for name in conds:
            self.add_module(f"mapper_{name}", nn.Linear(c_timestep, c * 2))

    def forward(self, x: torch.Tensor, cond: BlockConditioning) -> torch.Tensor:
        chunks = cond.timestep.chunk(len(self.conds) + 1, dim=1)
        ab = self.mapper(chunks[0])
        for name, chunk in zip(self.conds, chunks[1:], strict=True):
            ab = ab + getattr(self, f"mapper_{name}")(chunk)
        a, b = ab[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        return x * (1 + a) + b


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers key names)."""

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead = nhead
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(dropout)])

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.to_q(x).view(b, n, self.nhead, -1).transpose(1, 2)  # (B, heads, N, d)
        k = self.to_k(context).view(b, context.shape[1], self.nhead, -1).transpose(1, 2)
        v = self.to_v(context).view(b, context.shape[1], self.nhead, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)
        for layer in self.to_out:
            out = layer(out)
        return out


class AttnBlock(nn.Module):
    """Joint self + cross attention: queries are the pixels, keys/values are pixels and CLIP tokens."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def forward(self, x: torch.Tensor, cond: BlockConditioning) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = layer_norm_2d(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        context = self.kv_mapper(cond.clip)  # (B, L, C)
        if self.self_attn:
            context = torch.cat([tokens, context], dim=1)
        out = self.attention(tokens, context)  # (B, H*W, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class UpDownBlock2d(nn.Module):
    """A 1x1 conv plus an optional x2 bilinear resample (Stage C uses it with resampling disabled)."""

    def __init__(self, c_in: int, c_out: int, mode: str, enabled: bool = True) -> None:
        super().__init__()
        resample: nn.Module = (
            nn.Upsample(scale_factor=2 if mode == "up" else 0.5, mode="bilinear", align_corners=True)
            if enabled
            else nn.Identity()
        )
        mapping = nn.Conv2d(c_in, c_out, kernel_size=1)
        self.blocks = nn.ModuleList([resample, mapping] if mode == "up" else [mapping, resample])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x
