"""FP8 (e4m3) linears for Hopper GPUs: weights quantized per output row, activations per row.

``y = (x_q · s_x) (W_q · s_w)ᵀ + b`` with ``x_q``, ``W_q`` in ``float8_e4m3fn`` and float32 scales, one per
row of x and one per output feature, chosen so that each row's largest magnitude maps to e4m3's
largest finite value (448). The matmul is ``torch._scaled_mm`` (FP8 tensor cores, float32
accumulation, output in the model's dtype). :class:`Fp8Linear` keeps the original weight and bias
tensors (same state-dict keys, shared with the module it replaces) plus the quantized copy, so
:func:`disable_fp8` restores the exact model. With ``emulate=True`` the same quantization runs with a
float32 matmul on any device: the quality effect without the hardware.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

#: The largest finite float8_e4m3fn value.
E4M3_MAX = 448.0


def fp8_supported(device: torch.device) -> bool:
    """Whether ``device`` runs FP8 matmuls with per-row scales (compute capability 9.0: H100/H200)."""
    return (
        device.type == "cuda"
        and torch.cuda.is_available()
        and torch.cuda.get_device_capability(device) >= (9, 0)
        and hasattr(torch, "_scaled_mm")
    )


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) → (x_q (M, K) float8_e4m3fn, scale (M, 1) float32) with ``x ≈ x_q · scale`` row by row."""
    amax = x.abs().amax(dim=-1, keepdim=True).float()  # (M, 1)
    scale = amax.clamp_min(torch.finfo(torch.float32).tiny) / E4M3_MAX
    quantized = (x.float() / scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return quantized, scale


def fp8_matmul(
    x_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    out_dtype: torch.dtype,
    emulate: bool,
) -> torch.Tensor:
    """``(x_q · x_scale) @ (w_q · w_scale)ᵀ``: x_q (M, K), x_scale (M, 1), w_q (N, K), w_scale (1, N)."""
    if emulate:
        return ((x_q.float() * x_scale) @ (w_q.float() * w_scale.t()).t()).to(out_dtype)
    # w_q.t() is (K, N) column-major, as _scaled_mm wants its second operand.
    return torch._scaled_mm(x_q, w_q.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)


class Fp8Linear(nn.Linear):
    """An ``nn.Linear`` computed in FP8 (see the module docstring); ``weight``/``bias`` are the original's."""

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, linear: nn.Linear, emulate: bool = False) -> None:
        with torch.device("meta"):
            super().__init__(linear.in_features, linear.out_features, bias=linear.bias is not None)
        self.weight, self.bias = linear.weight, linear.bias  # the same tensors, not copies
        self.emulate = emulate
        with torch.no_grad():
            w_q, w_scale = quantize_rows(linear.weight)
        self.register_buffer("weight_fp8", w_q, persistent=False)  # (N, K)
        self.register_buffer("weight_scale", w_scale.reshape(1, -1).contiguous(), persistent=False)  # (1, N)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, self.in_features)  # (M, K)
        x_q, x_scale = quantize_rows(rows)
        out = fp8_matmul(x_q, x_scale, self.weight_fp8, self.weight_scale, x.dtype, self.emulate)
        if self.bias is not None:
            out = out + self.bias
        return out.view(*x.shape[:-1], self.out_features)


def fp8_eligible(linear: nn.Linear, min_features: int) -> bool:
    """FP8 matmuls need both dimensions multiples of 16; small ones gain nothing."""
    dims = (linear.in_features, linear.out_features)
    return all(d % 16 == 0 and d >= min_features for d in dims)


def enable_fp8(blocks: Sequence[nn.Module], min_features: int, emulate: bool) -> int:
    """Replace the eligible linears inside ``blocks`` by :class:`Fp8Linear`; returns how many."""
    replaced = 0
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if type(child) is nn.Linear and fp8_eligible(child, min_features):
                    setattr(parent, name, Fp8Linear(child, emulate))
                    replaced += 1
    return replaced


def disable_fp8(model: nn.Module) -> None:
    """Put plain ``nn.Linear`` modules (holding the same weights) back in place of every FP8 one."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Fp8Linear):
                with torch.device("meta"):
                    plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, name, plain)
