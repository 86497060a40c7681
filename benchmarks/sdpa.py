"""Which scaled-dot-product-attention kernel Stage C's attention gets, and what each costs.

    python benchmarks/sdpa.py            # on a GPU, bfloat16; prints "skipped: no CUDA" elsewhere

Shapes of the full Stage C at 1024² with classifier-free guidance: batch 2·B, 32 heads of 64, 576
pixel queries attending to the 576 pixels and the CLIP tokens (77 text + 4 pooled-text + 4 image).
Each backend (flash, memory-efficient, cuDNN, math) is forced in turn with ``sdpa_kernel``; one that
cannot run these inputs reports why. The default row is what ``nn/layers.Attention`` gets.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "math": SDPBackend.MATH,
}


def timed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, repeats: int) -> float:
    """Median milliseconds of one attention call."""
    F.scaled_dot_product_attention(q, k, v)  # warm-up
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        F.scaled_dot_product_attention(q, k, v)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4], help="images per call (B)")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("sdpa: skipped: no CUDA")
        return 0
    generator = torch.Generator("cuda").manual_seed(0)
    for batch in args.batches:
        shape_q, shape_kv = (2 * batch, 32, 576, 64), (2 * batch, 32, 576 + 85, 64)
        q = torch.randn(shape_q, device="cuda", dtype=torch.bfloat16, generator=generator)
        k, v = (torch.randn(shape_kv, device="cuda", dtype=torch.bfloat16, generator=generator) for _ in "kv")
        reference = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        print(f"batch {batch}: default {timed(q, k, v, args.repeats):.3f} ms")
        for name, backend in BACKENDS.items():
            try:
                with sdpa_kernel(backend):
                    milliseconds = timed(q, k, v, args.repeats)
                    error = (F.scaled_dot_product_attention(q, k, v).float() - reference).abs().max().item()
            except RuntimeError as failure:
                print(f"  {name:9s} unavailable: {str(failure).splitlines()[0]}")
                continue
            print(f"  {name:9s} {milliseconds:.3f} ms, max |error| vs float32 {error:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
