"""The building blocks of the Stage B / Stage C UNet.

Module and parameter names follow the diffusers layout so that its state dicts load unchanged.
Blocks split their work in two: ``prepare`` computes, once per generation, what depends only on the
conditioning (the CLIP keys and values of an attention block, the ``sca``/``crp`` part of a timestep
block's modulation); ``forward`` is the per-step part. Activations are kept channels-last (NCHW
tensors with NHWC strides), so that the channel layer norms and channel MLPs, which work on the
last dimension, need no permute copies. Without autograd, elementwise steps write into buffers of
their own making instead of allocating (same operations in the same order: bit-identical results),
and on CPUs a ResBlock's channel MLP runs as a kernel with the GELU fused into its first matmul
(:mod:`stable_cascade.nn.fused`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from stable_cascade.nn.fused import (
    grn_apply,
    grn_mlp_residual,
    grn_scale,
    joint_attention_projections,
    joint_linear,
    pack_linears,
    use_fused,
)
from stable_cascade.specs import UNetConfig

#: Per attached IP-Adapter: its image tokens' keys and values (B, M, C) and its scale.
IPKeyValues = tuple[tuple[torch.Tensor, torch.Tensor, float], ...]


class KeyValue(NamedTuple):
    """Projected attention keys and values of the CLIP tokens, each (B, L, C), the IP-Adapters', and for
    CPU inference the block's packed q/k/v projection (weight, bias; views of its parameters)."""

    key: torch.Tensor
    value: torch.Tensor
    ip: IPKeyValues = ()
    joint: tuple[torch.Tensor, torch.Tensor] | None = None


TensorLike = torch.Tensor | float

#: A block's step-invariant input: an attention block's CLIP ``KeyValue``, a timestep block's
#: ``sca``/``crp`` modulation terms (B, 2C) each, nothing for a ResBlock.
BlockState = KeyValue | tuple[torch.Tensor, ...] | None


def layer_norm_2d(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Non-affine layer norm over the channels of an NCHW tensor; the result is channels-last."""
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
    """ConvNeXt-V2 GRN over an NHWC tensor: ``gamma * (x * n) + beta + x``, in diffusers' op order.

    With ``fast`` (see :func:`set_fast_math`) it is one pass, ``x * (gamma * n + 1) + beta``, and in
    float32 the spatial L2 norm is a square root of a sum of squares, several times faster on CPUs
    than ``vector_norm`` over non-innermost dims; only the rounding differs.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.fast = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, H, W, C)
        n = grn_scale(x, self.fast)  # (B, 1, 1, C)
        if torch.is_grad_enabled() and self.fast:
            return torch.addcmul(self.beta, x, self.gamma * n + 1)
        if torch.is_grad_enabled():
            return self.gamma * (x * n) + self.beta + x
        # In place with fast: x is this block's own GELU output; otherwise the same steps, one buffer.
        return grn_apply(x, n, self.gamma, self.beta, self.fast, out=x if self.fast else None)


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

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        h = self.depthwise(x).permute(0, 2, 3, 1)  # (B, H, W, C), a view for channels-last x
        h = F.layer_norm(h, h.shape[-1:], eps=1e-6)
        first, _, grn, _, second = self.channelwise
        if use_fused(x) and not self.training and type(first) is type(second) is nn.Linear:  # not FP8
            assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
            assert isinstance(grn, GlobalResponseNorm)
            return grn_mlp_residual(x, h, skip, first, (grn.gamma, grn.beta), second, grn.fast)
        if skip is not None:
            h = torch.cat([h, skip.permute(0, 2, 3, 1)], dim=-1)  # (B, H, W, C + C_skip)
        return _add_residual(x, self.channelwise(h))


class TimestepBlock(nn.Module):
    """Affine modulation ``x * (1 + a) + b`` from the timestep embedding and each extra condition."""

    def __init__(self, c: int, c_timestep: int, conds: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.conds = conds
        self.mapper = nn.Linear(c_timestep, c * 2)
        for name in conds:
            self.add_module(f"mapper_{name}", nn.Linear(c_timestep, c * 2))
        self.fast = False  # see set_fast_math

    def prepare(self, cond_embeddings: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The step-invariant terms of ``(a, b)``: ``mapper_<cond>(emb(cond))`` (B, 2C) per condition
        (with ``fast``: their sum). ``cond_embeddings`` is (B, c_timestep · len(conds)), in order."""
        chunks = cond_embeddings.chunk(len(self.conds), dim=1) if self.conds else ()
        terms = tuple(getattr(self, f"mapper_{name}")(c) for name, c in zip(self.conds, chunks, strict=True))
        return (torch.stack(terms).sum(dim=0),) if self.fast and len(terms) > 1 else terms

    def forward(
        self, x: torch.Tensor, r_embed: torch.Tensor, prepared: tuple[torch.Tensor, ...]
    ) -> torch.Tensor:
        ab = self.mapper(r_embed)  # (B, 2C)
        for term in prepared:  # added one by one, in the reference's order
            ab = ab + term
        a, b = ab[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        if self.fast:
            return torch.addcmul(b, x, 1 + a)
        return x * (1 + a) + b if torch.is_grad_enabled() else (x * (1 + a)).add_(b)


class Attention(nn.Module):
    """Multi-head attention with biased q/k/v/out projections (diffusers key names).

    Heads are ``c // nhead`` wide, as in diffusers: when ``nhead`` does not divide ``c`` the
    projections are ``c → nhead · (c // nhead)`` (the inner width) and back.
    """

    def __init__(self, c: int, nhead: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.nhead = nhead
        inner = c // nhead * nhead
        self.to_q = nn.Linear(c, inner)
        self.to_k = nn.Linear(c, inner)
        self.to_v = nn.Linear(c, inner)
        self.to_out = nn.ModuleList([nn.Linear(inner, c), nn.Dropout(dropout)])

    def forward(
        self,
        x: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        ip: IPKeyValues = (),
        query: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Tokens x (B, N, C) attend to already projected keys and values (B, M, inner), with their own
        projected ``query`` (B, N, inner) if given; and apart to each IP-Adapter's keys and values,
        whose result, times its scale, is added before the output projection."""
        b, n, _ = x.shape
        q = self._heads(self.to_q(x) if query is None else query)  # (B, heads, N, d)
        out = F.scaled_dot_product_attention(q, self._heads(key), self._heads(value))  # (B, heads, N, d)
        for ip_key, ip_value, scale in ip:  # decoupled attention
            out = out + scale * F.scaled_dot_product_attention(q, self._heads(ip_key), self._heads(ip_value))
        out = out.transpose(1, 2).reshape(b, n, -1)  # (B, N, inner)
        for layer in self.to_out:
            out = layer(out)
        return out

    @property
    def projections(self) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        """The query, key and value projections; CPU inference packs them into one tensor each
        (:func:`pack_attention`) and a self-attention block then runs them as one matmul."""
        return self.to_q, self.to_k, self.to_v

    def _heads(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, M, inner) → (B, heads, M, d)."""
        return tokens.view(tokens.shape[0], tokens.shape[1], self.nhead, -1).transpose(1, 2)


class AttnBlock(nn.Module):
    """Joint self + cross attention: queries are the pixels, keys/values are pixels and CLIP tokens."""

    def __init__(self, c: int, c_cond: int, nhead: int, self_attn: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.self_attn = self_attn
        self.attention = Attention(c, nhead, dropout)
        self.kv_mapper = nn.Sequential(nn.SiLU(), nn.Linear(c_cond, c))

    def prepare(self, clip: torch.Tensor, ip: IPKeyValues = ()) -> KeyValue:
        """The step-invariant keys and values of the CLIP tokens ``clip`` (B, L, c_cond), with the
        IP-Adapters' of the image tokens (in this block's dtype)."""
        context = self.kv_mapper(clip)  # (B, L, C)
        ip = tuple((key.to(clip.dtype), value.to(clip.dtype), scale) for key, value, scale in ip)
        joint = joint_linear(self.attention.projections) if self.self_attn and use_fused(clip) else None
        return KeyValue(self.attention.to_k(context), self.attention.to_v(context), ip, joint)

    def forward(self, x: torch.Tensor, clip: KeyValue) -> torch.Tensor:
        b, c, h, w = x.shape
        # (B, H*W, C): the norm's output is contiguous NHWC whatever x's layout, so this is a view.
        tokens = F.layer_norm(x.permute(0, 2, 3, 1), (c,), eps=1e-6).reshape(b, h * w, c)
        key, value, ip, joint = clip
        query = None
        if self.self_attn:  # keys/values = [pixel tokens, clip tokens] projected, (B, H*W + L, inner)
            if joint is not None and use_fused(x):  # q, k, v of the pixels in one matmul, beside the CLIP's
                query, key, value = joint_attention_projections(tokens, *joint, key, value)
            else:
                key = torch.cat([self.attention.to_k(tokens), key], dim=1)
                value = torch.cat([self.attention.to_v(tokens), value], dim=1)
        out = self.attention(tokens, key, value, ip, query)  # (B, H*W, C)
        return _add_residual(x, out.view(b, h, w, c))


def _add_residual(x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """``x + update`` for x (B, C, H, W) and a fresh NHWC ``update`` (B, H, W, C); channels-last."""
    if torch.is_grad_enabled():
        return x + update.permute(0, 3, 1, 2)
    return update.add_(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


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


def pack_attention(model: nn.Module) -> None:
    """Pack the query, key and value projections of every self-attention block of ``model`` into one
    tensor each (:func:`~stable_cascade.nn.fused.pack_linears`; a no-op where they already are), so
    that CPU inference projects the pixels with one matmul."""
    for module in model.modules():
        if isinstance(module, AttnBlock) and module.self_attn:
            pack_linears(module.attention.projections)


def set_fast_math(model: nn.Module, enabled: bool = True) -> None:
    """Let every GRN and timestep block of ``model`` fuse its elementwise work (one pass instead of
    four, sums precomputed): faster, as accurate, but no longer bit-identical to diffusers."""
    for module in model.modules():
        if isinstance(module, (GlobalResponseNorm, TimestepBlock)):
            module.fast = enabled


# -- the UNet's input conventions ------------------------------------------------------------------


def conditioning_mapper(c_in: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, kernel_size=1), nn.GELU(), nn.Conv2d(c * 4, c, kernel_size=1), LayerNorm2d()
    )


def per_sample(value: TensorLike, batch: int, device: torch.device) -> torch.Tensor:
    """A scalar or (B,) value as a float (B,) tensor on ``device``."""
    tensor = torch.as_tensor(value, device=device)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim == 0:
        return tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"expected a scalar or one value per sample, shape ({batch},); got shape {tuple(tensor.shape)}"
        )
    return tensor


def condition_embeddings(
    cfg: UNetConfig, values: dict[str, TensorLike | None], batch: int, device: torch.device
) -> torch.Tensor:
    """(B, c_r · len(conds)): the embeddings of ``sca``/``crp`` in config order; a missing one is
    embedded as 0, as in the original. ``guidance`` (a CFG scale w, for a UNet with a guidance
    embedding; others refuse it) is embedded as w − 1: a missing one means no guidance."""
    if values.get("guidance") is not None and "guidance" not in cfg.timestep_conditioning_type:
        raise ValueError(
            "guidance is the input of a guidance embedding, which this UNet lacks; leave it out (its "
            "classifier-free guidance is guidance_scale)"
        )
    embeddings = []
    for name in cfg.timestep_conditioning_type:
        value = values[name]
        if name == "guidance" and value is not None:
            value = per_sample(value, batch, device) - 1
        t = torch.zeros(batch, device=device) if value is None else per_sample(value, batch, device)
        embeddings.append(timestep_embedding(t, cfg.timestep_ratio_embedding_dim))
    return torch.cat(embeddings, dim=1) if embeddings else torch.zeros(batch, 0, device=device)
