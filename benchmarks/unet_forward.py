"""One UNet forward, ours vs diffusers, on identical random weights (CPU, float32).

Runs are interleaved (ours, theirs, ours, ...) after a warm-up so that machine noise hits both
alike; prints the medians and the ratio ours/diffusers (below 1 means we are faster).

    python benchmarks/unet_forward.py [--repeats 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
from functools import partial

import harness  # first: it puts this checkout on sys.path
import torch
from diffusers import StableCascadeUNet as DiffusersUNet

from stable_cascade import StableCascadeUNet
from stable_cascade.specs import UNetConfig

# The "mid" setup of the cascade benchmark: the real structure scaled down, Stage C with two CTA
# levels at the real 24x24 latent, Stage B with four levels and repeat mappers at 128x128.
MID = harness.SETUPS["mid"]
CONFIGS: dict[str, tuple[UNetConfig, tuple[int, int]]] = {
    "stage_c_mid": (MID.prior, MID.prior_size),
    "stage_b_mid": (MID.decoder, MID.decoder_size),
}


def inputs_for(config: UNetConfig, size: tuple[int, int], batch: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(batch, config.in_channels, *size, generator=g),
        "timestep_ratio": torch.full((batch,), 0.5),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
    }
    if config.clip_text_in_channels:
        inputs["clip_text"] = torch.randn(batch, 77, config.clip_text_in_channels, generator=g)
        inputs["clip_img"] = torch.zeros(batch, 1, config.clip_image_in_channels or 0)
    if config.effnet_in_channels:
        inputs["effnet"] = torch.randn(batch, config.effnet_in_channels, 24, 24, generator=g)
    return inputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, medians of {args.repeats}")
    print(f"{'config':<14}{'ours ms':>10}{'diffusers ms':>14}{'ours/diffusers':>16}")
    for name, (config, size) in CONFIGS.items():
        theirs = DiffusersUNet(**config.to_dict()).eval()
        ours = StableCascadeUNet(config).eval()
        ours.load_state_dict(theirs.state_dict())
        inputs = inputs_for(config, size)
        with torch.inference_mode():
            runs = {"ours": partial(ours, **inputs), "diffusers": partial(theirs, **inputs)}
            times = harness.interleaved(runs, args.repeats, torch.device("cpu"), warmup=2)
        ours_ms = statistics.median(times["ours"]) * 1e3
        theirs_ms = statistics.median(times["diffusers"]) * 1e3
        print(f"{name:<14}{ours_ms:>10.1f}{theirs_ms:>14.1f}{ours_ms / theirs_ms:>16.3f}")


if __name__ == "__main__":
    main()
