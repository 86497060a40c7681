"""A Stage C IP-Adapter's configuration, as data (stored in its file's metadata)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar, Literal

from stable_cascade.specs.base import ConfigBase

#: ``embeds``: the CLIP image embedding (B, N, C) through a linear projection to ``num_tokens`` tokens;
#: ``patches``: the vision tower's penultimate hidden states (B, N, P, C) through a small resampler.
IPInput = Literal["embeds", "patches"]


@dataclasses.dataclass(frozen=True)
class IPAdapterConfig(ConfigBase):
    """An IP-Adapter of one Stage C architecture: ``image_dim`` wide inputs become ``num_tokens`` tokens
    of the prior's ``conditioning_dim`` per image; every attention block of the prior gets its own
    key and value projections of them, ``inner_dims`` (one per block, in the forward pass's order)."""

    diffusers_class_name: ClassVar[str] = "IPAdapter"

    image_dim: int = 768
    conditioning_dim: int = 2048
    inner_dims: tuple[int, ...] = ()
    num_tokens: int = 4
    input: IPInput = "embeds"
    resampler_width: int = 256
    resampler_depth: int = 2
    resampler_heads: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.input not in ("embeds", "patches"):
            raise ValueError(f"input must be 'embeds' or 'patches', got {self.input!r}")
        sizes = (self.image_dim, self.conditioning_dim, self.num_tokens, self.resampler_width)
        if min(sizes) < 1 or self.resampler_depth < 1 or self.resampler_heads < 1:
            raise ValueError(f"IP-Adapter sizes must be positive, got {sizes}")
        if not self.inner_dims or min(self.inner_dims) < 1:
            raise ValueError(
                f"inner_dims names one positive width per attention block, got {self.inner_dims}"
            )
        if self.resampler_width % self.resampler_heads:
            raise ValueError(
                f"resampler_width {self.resampler_width} must be a multiple of resampler_heads "
                f"{self.resampler_heads}"
            )
