"""CPU inference kernels for the channel MLPs, the biggest non-matmul cost of Stage A and Stage B.

A channel MLP ``Linear(C, 4C) → GELU [→ GRN] → Linear(4C, C)`` plus its residual, written op by op,
streams its (tokens, 4C) hidden activation through main memory five to fifteen times (the first
linear writes it, GELU reads and writes it, each GRN step does, the second linear reads it). Here it
is computed in row chunks that stay in the CPU's cache:

* :func:`mlp_residual` (Stage A's mixing blocks): per chunk ``x + gate · W2 · GELU(W1 · h + b1) + b2``;
* :func:`grn_mlp_residual` (the UNet's ResBlocks): a first pass writes ``GELU(W1 · h + b1)`` once and
  sums its squares per channel (the GRN statistic); a second pass reads it back chunk by chunk, scales
  it by the GRN's ``γ · n + 1`` and applies the second linear, whose bias absorbs the GRN's ``β``.

Same operations as the unfused modules up to float rounding (the parity tests' tolerances hold).
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
) -> torch.Tensor:
    """``x + second(GRN(GELU(first(cat(h, skip)))))``, concatenated chunk by chunk: x (B, C, H, W)
    channels-last, h (B, H, W, C), skip (B, C_skip, H, W) or None → like x. ``grn``: the GRN's
    ``(gamma, beta)``, (1, 1, 1, 4C) each."""
    src, res = _rows(h, nchw=False), _rows(x)
    extra = None if skip is None else _rows(skip)
    batch, tokens, width = src.shape[0], src.shape[1], first.out_features
    hidden = h.new_empty(batch, tokens, width)
    sums = h.new_zeros(batch, width)
    step = _chunk_rows(width, h.element_size())
    joined = None if extra is None else h.new_empty(step, first.in_features)  # one chunk of cat(h, skip)
    for b in range(batch):
        for s in range(0, tokens, step):
            hid, rows = hidden[b, s : s + step], src[b, s : s + step]
            if extra is not None and joined is not None:
                rows = torch.cat([rows, extra[b, s : s + step]], dim=1, out=joined[: rows.shape[0]])
            torch.addmm(first.bias, rows, first.weight.t(), out=hid)
            torch.ops.aten.gelu_(hid)
            sums[b] += hid.square().sum(dim=0)
    norm = sums.sqrt_()  # (B, 4C): the spatial L2 norm of every channel
    gamma, beta = grn
    scale = gamma.view(1, -1) * (norm / (norm.mean(dim=1, keepdim=True) + 1e-6)) + 1  # (B, 4C)
    bias = torch.addmv(second.bias, second.weight, beta.view(-1))  # (C,): W2 · β + b2
    out = torch.empty_like(x, memory_format=torch.channels_last)
    dst = _rows(out)
    tmp = h.new_empty(step, second.out_features)
    for b in range(batch):
        for s in range(0, tokens, step):
            e = min(s + step, tokens)
            t, hid = tmp[: e - s], hidden[b, s:e].mul_(scale[b])  # the GRN, while the chunk is cached
            torch.addmm(bias, hid, second.weight.t(), out=t)
            torch.add(res[b, s:e], t, out=dst[b, s:e])
    return out
