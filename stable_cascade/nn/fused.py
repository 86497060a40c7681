"""CPU inference kernels: the channel MLPs (the biggest non-matmul cost of Stage A and Stage B) and
the attention projections.

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

Also here: a self-attention block's query, key and value projections as one matmul over weights
packed into one tensor (:func:`pack_linears`, :func:`joint_attention_projections`), writing the
pixels' keys and values beside the CLIP tokens' instead of concatenating them each step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

#: Target size of one chunk of the hidden activation: a slice of a server CPU's shared L3 cache, large
#: enough for full-speed matmuls and few parallel regions, small enough to bound the extra memory.
CHUNK_BYTES = 16 << 20

_ONEDNN = torch.backends.mkldnn.is_available()
_ALIGNMENT = 64  # bytes: where torch's CPU allocator starts every tensor


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


# -- attention: the query, key and value projections as one matmul ----------------------------------


def pack_linears(layers: tuple[nn.Linear, ...]) -> None:
    """Move the weights of ``layers``, linears over the same input, into one tensor, and their biases
    into another, in order (the same values and the same ``Parameter`` objects; their ``state_dict``
    entries become non-overlapping views, which safetensors and ``torch.save`` write as usual), so
    that :func:`joint_linear` can run them as one matmul. Left as they are when already packed, or
    when they cannot share one: LoRA-wrapped or other layer types, no bias, mixed dtypes or devices,
    parameters that are parts of a larger tensor (as under FSDP), or a part that would not start on
    the 64-byte boundary every fresh CPU allocation has (CPU kernels take other paths on misaligned
    rows, and the layers' own results would change in the last bits)."""
    if not _plain(layers):
        return
    groups = [layer.weight for layer in layers], [layer.bias for layer in layers]
    if all(_consecutive(parts) for parts in groups) or not all(_movable(parts) for parts in groups):
        return
    with torch.inference_mode(False), torch.no_grad():  # parameters must stay usable for training
        for parts in groups:
            joint = torch.cat([p.detach() for p in parts])
            for p, rows in zip(parts, joint.split([p.shape[0] for p in parts]), strict=True):
                p.data = rows


def _movable(parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``parts`` can move into one tensor, each still 64-byte aligned (see :func:`pack_linears`)."""
    first = parts[0]
    return all(
        (p.dtype, p.device, p.shape[1:]) == (first.dtype, first.device, first.shape[1:])
        and p.is_contiguous()
        and p.untyped_storage().nbytes() == p.nbytes  # not a view of something else's memory
        and p.nbytes % _ALIGNMENT == 0
        for p in parts
    )


def joint_linear(layers: tuple[nn.Linear, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The weight (ΣC_out, C_in) and bias of ``layers`` packed by :func:`pack_linears`, as views of one
    tensor each: one matmul computes all their outputs side by side, each output element the same dot
    product as in its own layer (bit-identical; one call instead of three is ~5 % of a UNet step on
    CPUs). None unless they are packed."""
    if not _plain(layers):
        return None
    weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
    if not (_consecutive(weights) and _consecutive(biases)):
        return None
    return _spanning(weights), _spanning(biases)


def _plain(layers: tuple[nn.Linear, ...]) -> bool:
    return all(type(layer) is nn.Linear and layer.bias is not None for layer in layers)


def _spanning(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Consecutive ``parts`` as one tensor: a view spanning them."""
    first, rows = parts[0], sum(p.shape[0] for p in parts)
    return first.as_strided((rows, *first.shape[1:]), first.stride(), first.storage_offset())


def _consecutive(parts: Sequence[torch.Tensor]) -> bool:
    """Whether ``parts`` are contiguous and follow each other in one storage, in order."""
    storage, offset = parts[0].untyped_storage().data_ptr(), parts[0].storage_offset()
    for p in parts:
        if not p.is_contiguous() or p.untyped_storage().data_ptr() != storage or p.storage_offset() != offset:
            return False
        offset += p.numel()
    return True


def joint_attention_projections(
    tokens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention inputs in one matmul: ``tokens`` (B, N, C) projected by the joint q/k/v ``weight``
    (3·I, C) and ``bias`` straight into one (B, N + L, 3·I) buffer whose last L rows hold the CLIP
    tokens' ``key`` and ``value`` (B, L, I) → queries (B, N, I), keys and values (B, N + L, I): views,
    no concatenation (for one sample; a batch's projections are copied in, one copy for all three)."""
    b, n, _ = tokens.shape
    inner = key.shape[-1]
    out = tokens.new_empty(b, n + key.shape[1], 3 * inner)
    out[:, n:, inner : 2 * inner] = key
    out[:, n:, 2 * inner :] = value
    rows = tokens.reshape(b * n, -1)  # one matmul over every sample, as the separate projections do
    if b == 1:  # the sample's rows of the buffer are contiguous: written in place
        torch.addmm(bias, rows, weight.t(), out=out[0, :n])
    else:
        out[:, :n] = torch.addmm(bias, rows, weight.t()).view(b, n, -1)
    return out[:, :n, :inner], out[:, :, inner : 2 * inner], out[:, :, 2 * inner :]
