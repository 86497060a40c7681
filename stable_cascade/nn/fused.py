"""CPU inference kernels for the channel MLPs, the biggest non-matmul cost of Stage A and Stage B.

A channel MLP ``Linear(C, 4C) → GELU [→ GRN] → Linear(4C, C)`` plus its residual, written op by op,
streams its (tokens, 4C) hidden activation through main memory five to fifteen times (the first
linear writes it, GELU reads and writes it, each GRN step does, the second linear reads it). Here it
is computed in row chunks that stay in the CPU's cache:

* :func:`mlp_residual` (Stage A's mixing blocks): per chunk ``x + gate · W2 · GELU(W1 · h + b1) + b2``;
* :func:`grn_mlp_residual` (the UNet's ResBlocks): a first pass writes ``GELU(W1 · h + b1)`` once, the
  GRN's statistic (a spatial norm per channel) reads it once, and a second pass reads it back chunk by
  chunk for the GRN's elementwise steps, the second linear and the residual.

Same operations on the same values in the same order as the modules: bit-identical results, except
where the matmul library blocks a chunk's rows differently from the whole (float rounding, ~1e-7
relative).
They run only where they pay (:func:`use_fused`): on CPUs, without autograd, not while
``torch.compile`` traces, and for blocks at most :data:`MAX_CHANNELS` wide: every chunk reads both
weight matrices again, which stays in the cache only while they are small (measured on a 2-core Xeon:
the op-by-op block's time × 0.55 at 64 and 320 channels, × 0.98 at 384, × 1.1 at 640, × 2 at 1280).
Results are written channels-last, as the blocks keep their activations.
"""

from __future__ import annotations

import torch
from torch import nn

#: Target size of one chunk of the hidden activation: about a core's L2 cache.
CHUNK_BYTES = 1 << 20
#: The widest block (channels of x) that runs fused.
MAX_CHANNELS = 384


def use_fused(x: torch.Tensor) -> bool:
    """Whether a block's input x (B, C, H, W) goes through these kernels (see the module docstring)."""
    return (
        x.device.type == "cpu"
        and x.shape[1] <= MAX_CHANNELS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
    )


def _chunk_rows(hidden: int, element_size: int) -> int:
    return max(32, CHUNK_BYTES // (hidden * element_size))


def _rows(t: torch.Tensor, nchw: bool = True) -> torch.Tensor:
    """(B, C, H, W), or (B, H, W, C) with ``nchw=False`` → (B, H·W, C): a view of channels-last
    memory, a copy otherwise."""
    nhwc = t.permute(0, 2, 3, 1) if nchw else t
    return nhwc.reshape(t.shape[0], -1, nhwc.shape[-1])


def mlp_residual(
    x: torch.Tensor, h: torch.Tensor, first: nn.Linear, second: nn.Linear, gate: torch.Tensor
) -> torch.Tensor:
    """``x + gate · second(GELU(first(h)))``: x (B, C, H, W) channels-last, h (B, H, W, C) → like x."""
    src, res = _rows(h, nchw=False), _rows(x)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    dst = _rows(out)
    step = _chunk_rows(first.out_features, h.element_size())
    hidden = h.new_empty(step, first.out_features)
    tmp = h.new_empty(step, second.out_features)
    w1, w2 = first.weight.t(), second.weight.t()
    for b in range(x.shape[0]):
        for s in range(0, src.shape[1], step):
            e = min(s + step, src.shape[1])
            hid, t = hidden[: e - s], tmp[: e - s]
            torch.addmm(first.bias, src[b, s:e], w1, out=hid)
            torch.ops.aten.gelu_(hid)
            torch.addmm(second.bias, hid, w2, out=t)
            torch.addcmul(res[b, s:e], t, gate, out=dst[b, s:e])
    return out


def grn_mlp_residual(
    x: torch.Tensor,
    h: torch.Tensor,
    skip: torch.Tensor | None,
    first: nn.Linear,
    grn: tuple[torch.Tensor, torch.Tensor],
    second: nn.Linear,
    fast: bool = False,
) -> torch.Tensor:
    """``x + second(GRN(GELU(first(cat(h, skip)))))``, concatenated chunk by chunk: x (B, C, H, W)
    channels-last, h (B, H, W, C), skip (B, C_skip, H, W) or None → like x. ``grn``: the GRN's
    ``(gamma, beta)``, (1, 1, 1, 4C) each; ``fast``: its fast-math form. Each step is the module's
    operation, in its order, on the same values (see the module docstring)."""
    src, res = _rows(h, nchw=False), _rows(x)
    extra = None if skip is None else _rows(skip)
    batch, tokens, width = src.shape[0], src.shape[1], first.out_features
    hidden = h.new_empty(batch, tokens, width)
    step = _chunk_rows(width, h.element_size())
    joined = None if extra is None else h.new_empty(step, first.in_features)  # one chunk of cat(h, skip)
    flat_src, flat_hidden = src.reshape(batch * tokens, -1), hidden.view(batch * tokens, width)
    flat_extra = None if extra is None else extra.reshape(batch * tokens, -1)
    for s in range(0, batch * tokens, step):  # rows of all samples, as the module's one linear
        hid, rows = flat_hidden[s : s + step], flat_src[s : s + step]
        if flat_extra is not None and joined is not None:
            rows = torch.cat([rows, flat_extra[s : s + step]], dim=1, out=joined[: rows.shape[0]])
        torch.addmm(first.bias, rows, first.weight.t(), out=hid)
        torch.ops.aten.gelu_(hid)
    gamma, beta = (p.view(-1) for p in grn)
    n = grn_scale(hidden.view(*h.shape[:3], width), fast).view(batch, width)  # (B, 4C)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    dst = _rows(out)
    grn_out, tmp = h.new_empty(step, width), h.new_empty(step, second.out_features)
    for b in range(batch):
        for s in range(0, tokens, step):
            e = min(s + step, tokens)
            y, t = grn_apply(hidden[b, s:e], n[b], gamma, beta, fast, grn_out[: e - s]), tmp[: e - s]
            torch.addmm(second.bias, y, second.weight.t(), out=t)
            torch.add(t, res[b, s:e], out=dst[b, s:e])
    return out


def grn_scale(x: torch.Tensor, fast: bool) -> torch.Tensor:
    """The GRN's per-channel scale ``n`` (B, 1, 1, C) of x (B, H, W, C): its spatial L2 norm over the
    channels' mean. ``fast`` (float32): a square root of a sum of squares, several times faster on CPUs
    than ``vector_norm`` over non-innermost dims, clamped so that an all-zero channel gets
    ``vector_norm``'s zero gradient, not NaN."""
    if fast and x.dtype == torch.float32:
        g = x.square().sum(dim=(1, 2), keepdim=True).clamp_min(torch.finfo(x.dtype).tiny).sqrt()
    else:
        g = torch.linalg.vector_norm(x, dim=(1, 2), keepdim=True)
    return g / (g.mean(dim=-1, keepdim=True) + 1e-6)


def grn_apply(
    x: torch.Tensor,
    n: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    fast: bool,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The GRN's elementwise steps without autograd, into ``out`` (a new tensor if None): diffusers'
    ``gamma * (x * n) + beta + x`` in its order, or with ``fast`` one pass ``x * (gamma * n + 1) + beta``."""
    if fast:
        return torch.addcmul(beta, x, gamma * n + 1, out=out)
    scaled = torch.mul(x, n) if out is None else torch.mul(x, n, out=out)
    return scaled.mul_(gamma).add_(beta).add_(x)
