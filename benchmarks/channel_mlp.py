"""The blocks around the channel MLP kernels (``nn/fused.py``), ours vs diffusers', on a CPU.

One block at a time, with the same random weights on both sides, at the shapes the pipeline benchmark
(``pipelines.py``) runs: Stage A's mixing blocks decoding a 512² image, Stage B's ResBlocks at the
``mid`` and ``lite`` decoders' levels (with a skip where the up path has one), Stage C's at the
``mid`` and ``lite`` widths and the full prior's 2048 at 24×24. Three runs per block, interleaved
round by round: diffusers' block (its tensors channels-first, as its models keep them), ours with the
kernels switched off (the op-by-op module, channels-last) and ours as it runs (the kernels). Medians
and ratios; below 1 the kernel is faster. Batch 1 (no guidance), float32, inference mode.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/channel_mlp.py     # what the CLI sets
    python benchmarks/channel_mlp.py --repeats 3 --blocks stage-a-384
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import harness  # first: it puts this checkout on sys.path
import torch
from diffusers.models.unets.unet_stable_cascade import SDCascadeResBlock
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import MixingResidualBlock

from stable_cascade.nn import layers, stage_a
from stable_cascade.nn.layers import ResBlock
from stable_cascade.nn.stage_a import MixingBlock


@dataclasses.dataclass(frozen=True)
class Block:
    kind: str  # "stage-a" (a mixing block) or "unet" (a ResBlock)
    channels: int
    side: int  # tokens: side²
    skip: int = 0  # ResBlock skip channels


BLOCKS: dict[str, Block] = {
    "stage-a-384": Block("stage-a", 384, 128),  # the full Stage A's latent level, 512² image
    "stage-a-192": Block("stage-a", 192, 256),  # its first level
    "b-mid-64": Block("unet", 64, 128),
    "b-mid-64-skip": Block("unet", 64, 128, 64),
    "b-mid-128": Block("unet", 128, 64),
    "b-mid-256": Block("unet", 256, 32),
    "b-mid-256-skip": Block("unet", 256, 16, 256),
    "b-lite-160": Block("unet", 160, 64),
    "b-lite-576": Block("unet", 576, 16),
    "c-mid-512": Block("unet", 512, 12),
    "c-lite-1536": Block("unet", 1536, 12),
    "c-full-2048": Block("unet", 2048, 24),
}


def twins(block: Block, seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """diffusers' block with random weights and ours holding the same tensors."""
    torch.manual_seed(seed)
    theirs: torch.nn.Module
    ours: torch.nn.Module
    if block.kind == "stage-a":
        theirs, ours = MixingResidualBlock(block.channels, 4 * block.channels), MixingBlock(block.channels)
    else:
        theirs, ours = SDCascadeResBlock(block.channels, block.skip), ResBlock(block.channels, block.skip)
    with torch.no_grad():
        for p in theirs.parameters():
            p.normal_(0, 0.05)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs.eval(), ours.eval()


@contextmanager
def kernels_off() -> Any:
    """Our blocks run their op-by-op module code."""
    saved = stage_a.use_fused, layers.use_fused
    stage_a.use_fused = layers.use_fused = lambda x: False
    try:
        yield
    finally:
        stage_a.use_fused, layers.use_fused = saved


def runs(block: Block) -> dict[str, Callable[[], object]]:
    theirs, ours = twins(block, seed=block.channels)
    x = torch.randn(1, block.channels, block.side, block.side)
    skip = torch.randn(1, block.skip, block.side, block.side) if block.skip else None
    x_last = x.contiguous(memory_format=torch.channels_last)
    skip_last = None if skip is None else skip.contiguous(memory_format=torch.channels_last)

    def call(module: torch.nn.Module, x: torch.Tensor, skip: torch.Tensor | None) -> torch.Tensor:
        return module(x) if block.kind == "stage-a" else module(x, skip)

    def op_by_op() -> object:
        with kernels_off():
            return call(ours, x_last, skip_last)

    expected = call(theirs, x, skip)
    for got in (op_by_op(), call(ours, x_last, skip_last)):
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    return {
        "diffusers": lambda: call(theirs, x, skip),
        "op by op": op_by_op,
        "kernel": lambda: call(ours, x_last, skip_last),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--blocks", nargs="+", default=list(BLOCKS), choices=list(BLOCKS))
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} threads, float32, batch 1, medians of {args.repeats} "
        f"interleaved rounds; OMP_WAIT_POLICY: {os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"load average at the start: {os.getloadavg()[0]:.2f}"
    )
    print(
        f"{'block':16} {'diffusers ms':>12} {'op by op ms':>12} {'kernel ms':>10} {'kernel/diffusers':>17} "
        f"{'kernel/op by op':>16}"
    )
    cpu = torch.device("cpu")
    with torch.inference_mode():
        for name in args.blocks:
            times = harness.medians(harness.interleaved(runs(BLOCKS[name]), args.repeats, cpu))
            ms = {k: 1e3 * v for k, v in times.items()}
            print(
                f"{name:16} {ms['diffusers']:12.2f} {ms['op by op']:12.2f} {ms['kernel']:10.2f} "
                f"{ms['kernel'] / ms['diffusers']:17.3f} {ms['kernel'] / ms['op by op']:16.3f}",
                flush=True,
            )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
