"""CPU inference kernels for the channel MLPs, the biggest non-matmul cost of Stage A and Stage B.

A channel MLP ``Linear(C, 4C) → GELU [→ GRN] → Linear(4C, C)`` plus its residual, written op by op,
streams its (tokens, 4C) hidden activation through main memory five to fifteen times (the first
linear writes it, GELU reads and writes it, each GRN step does, the second linear reads it) and makes
a channels-first copy of the result before the residual. Here:

* each linear is one oneDNN call (:func:`linear`) with the GELU fused into the first one's output, so
  the hidden activation is written once, already activated (float32; other dtypes, or a torch built
  without oneDNN: the module's ``F.linear`` and an in-place GELU);
* :func:`mlp_residual` (Stage A's mixing blocks) runs the MLP in row chunks of :data:`CHUNK_BYTES`,
  writing ``x + gate · MLP(h)`` straight into the channels-last result;
* :func:`grn_mlp_residual` (the UNet's ResBlocks): the first linear over all rows, the GRN's statistic
  (a spatial norm per channel) in one read, then chunk by chunk the GRN's elementwise steps, the second
  linear and the residual.

Same operations on the same values in the same order as the modules; only the matmul library's
blocking differs (float rounding, ~1e-7 relative). They run only where they pay (:func:`use_fused`):
on CPUs, without autograd, not while ``torch.compile`` traces. Measured on a 2-core Xeon (Ice Lake,
2 threads, quiet, ``OMP_WAIT_POLICY=PASSIVE``; ``benchmarks/channel_mlp.py``): diffusers' block's
time × 0.5–0.7 for Stage A's blocks, × 0.7–0.9 for Stage B's, × 0.9 for Stage C's 1536 channels; our
op-by-op module's × 0.8–1.0. The chunks are large on purpose: a chunk the size of a core's L2 cache
(1 MiB, what this module used before) made thousands of short parallel regions per image, each a
wake-up of sleeping OpenMP threads under the passive wait policy, and smaller matmuls: up to 1.6× the
op-by-op time on a quiet machine.
Results are written channels-last, as the blocks keep their activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Target size of one chunk of the hidden activation: a slice of a server CPU's shared L3 cache, large
#: enough for full-speed matmuls and few parallel regions, small enough to bound the extra memory.
CHUNK_BYTES = 16 << 20

_ONEDNN = torch.backends.mkldnn.is_available()


def use_fused(x: torch.Tensor) -> bool:
    """Whether a block's input x (B, C, H, W) goes through these kernels (see the module docstring)."""
    return x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.compiler.is_compiling()


def linear(rows: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """``layer(rows)`` (N, C_in) → (N, C_out), then the exact (erf) GELU if ``gelu``: one oneDNN call
    with the GELU applied to each output tile while it is in the cache (float32)."""
    if _ONEDNN and rows.dtype == torch.float32 and layer.weight.dtype == torch.float32:
        activation, algorithm = ("gelu", "none") if gelu else ("none", "")
        return torch.ops.mkldnn._linear_pointwise(rows, layer.weight, layer.bias, activation, [], algorithm)
    out = F.linear(rows, layer.weight, layer.bias)
    return torch.ops.aten.gelu_(out) if gelu else out


def _chunk_rows(rows: int, hidden: int, element_size: int) -> int:
    """Rows per chunk: ``rows`` split into equal chunks of at most about :data:`CHUNK_BYTES` of hidden
    activation (no ragged sliver at the end), at least 32 rows each."""
    chunks = -(-rows * hidden * element_size // CHUNK_BYTES)
    return max(32, -(-rows // chunks))


def _rows(t: torch.Tensor, nchw: bool = True) -> torch.Tensor:
    """(B, C, H, W), or (B, H, W, C) with ``nchw=False`` → (B, H·W, C): a view of channels-last
    memory, a copy otherwise."""
    nhwc = t.permute(0, 2, 3, 1) if nchw else t
    return nhwc.reshape(t.shape[0], -1, nhwc.shape[-1])


def mlp_residual(
    x: torch.Tensor, h: torch.Tensor, first: nn.Linear, second: nn.Linear, gate: torch.Tensor
) -> torch.Tensor:
    """``x + gate · second(GELU(first(h)))``: x (B, C, H, W) channels-last, h (B, H, W, C) → like x."""
    src, res = _rows(h, nchw=False).flatten(0, 1), _rows(x).flatten(0, 1)  # (B·H·W, C)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    dst = _rows(out).flatten(0, 1)  # a view: rows written here land in out
    step = _chunk_rows(src.shape[0], first.out_features, h.element_size())
    for s in range(0, src.shape[0], step):
        hidden = linear(src[s : s + step], first, gelu=True)
        torch.addcmul(res[s : s + step], linear(hidden, second), gate, out=dst[s : s + step])
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
    """``x + second(GRN(GELU(first(cat(h, skip)))))``: x (B, C, H, W) channels-last, h (B, H, W, C),
    skip (B, C_skip, H, W) or None → like x. ``grn``: the GRN's ``(gamma, beta)``, (1, 1, 1, 4C) each;
    ``fast``: its fast-math form. Each step is the module's operation, in its order, on the same values
    (see the module docstring)."""
    src, res = _rows(h, nchw=False), _rows(x)
    batch, tokens, width = src.shape[0], src.shape[1], first.out_features
    rows = src.reshape(batch * tokens, -1)
    if skip is not None:
        rows = torch.cat([rows, _rows(skip).reshape(batch * tokens, -1)], dim=1)  # (B·H·W, C + C_skip)
    hidden = linear(rows, first, gelu=True).view(batch, tokens, width)
    gamma, beta = (p.view(-1) for p in grn)
    n = grn_scale(hidden.view(*h.shape[:3], width), fast).view(batch, width)  # (B, 4C)
    out = torch.empty_like(x, memory_format=torch.channels_last)
    dst = _rows(out)
    step = _chunk_rows(tokens, width, h.element_size())
    scratch = h.new_empty(min(step, tokens), width)
    for b in range(batch):
        for s in range(0, tokens, step):
            e = min(s + step, tokens)
            y = grn_apply(hidden[b, s:e], n[b], gamma, beta, fast, scratch[: e - s])
            torch.add(linear(y, second), res[b, s:e], out=dst[b, s:e])
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
