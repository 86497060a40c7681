"""``python -m stable_cascade``: describe the released Stable Cascade models (built on meta, no download)."""

from __future__ import annotations

import torch

from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS


def main() -> None:
    print(f"{'model':<14}{'stage':<10}{'parameters':>16}  latent for 1024x1024")
    with torch.device("meta"):
        for name in ("prior", "prior_lite", "decoder", "decoder_lite"):
            config = UNET_VARIANTS[name]
            count = sum(p.numel() for p in StableCascadeUNet(config).parameters())
            stage, latent = ("B", "4x256x256") if config.is_stage_b else ("C", "16x24x24")
            print(f"{name:<14}{stage:<10}{count:>16,}  {latent}")
        count = sum(p.numel() for p in PaellaVQModel(VQ_VARIANTS["vqgan"]).parameters())
        print(f"{'vqgan':<14}{'A':<10}{count:>16,}  image 3x1024x1024")


if __name__ == "__main__":
    main()
