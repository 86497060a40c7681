"""Stage A: the Paella VQGAN, an f4 image autoencoder used without quantisation at inference.

Matches diffusers' ``PaellaVQModel`` (state-dict keys, shapes and numerics), which ports the
original Würstchen / Stable Cascade ``StageA``. Images are in [0, 1]; ``config.scale_factor`` is
the factor a pipeline multiplies Stage B latents by before :meth:`PaellaVQModel.decode`. Activations
are channels-last inside the model (the norms and the channel MLP work on the channel dimension),
and large images can be decoded in tiles (:meth:`PaellaVQModel.enable_tiling`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from stable_cascade.checkpoint.pretrained import PretrainedModel
from stable_cascade.convert import (
    Kind,
    to_original_state_dict,
    vq_config_from_single_file,
    vq_state_dict_from_single_file,
)
from stable_cascade.nn.fused import mlp_residual, use_fused
from stable_cascade.specs import VQConfig


@dataclasses.dataclass
class VQEncoderOutput:
    latents: torch.Tensor  # (B, latent_channels, H / f, W / f)


@dataclasses.dataclass
class DecoderOutput:
    sample: torch.Tensor  # (B, out_channels, H, W)


class MixingBlock(nn.Module):
    """Residual block: a gated depthwise 3×3 conv, then a gated per-pixel MLP, each on a modulated norm."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        conv = nn.Conv2d(channels, channels, kernel_size=3, groups=channels)
        self.depthwise = nn.Sequential(nn.ReplicationPad2d(1), conv)
        self.channelwise = nn.Sequential(
            nn.Linear(channels, 4 * channels), nn.GELU(), nn.Linear(4 * channels, channels)
        )
        # (scale, shift, gate) for each branch; zero at init, so an untrained block is the identity.
        self.gammas = nn.Parameter(torch.zeros(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W), fastest channels-last
        g, c = self.gammas, x.shape[1]
        # norm·(1 + g0) + g1 is a layer norm with weight 1 + g0 and bias g1: one pass over x.
        h = F.layer_norm(x.permute(0, 2, 3, 1), (c,), (1 + g[0]).expand(c), g[1].expand(c), eps=1e-6)
        x = torch.addcmul(x, self.depthwise(h.permute(0, 3, 1, 2)), g[2])  # x + dw(h)·g2
        h = F.layer_norm(x.permute(0, 2, 3, 1), (c,), (1 + g[3]).expand(c), g[4].expand(c), eps=1e-6)
        if use_fused(x) and not self.training:
            first, _, second = self.channelwise
            assert isinstance(first, nn.Linear) and isinstance(second, nn.Linear)
            return mlp_residual(x, h, first, second, g[5])
        return torch.addcmul(x, self.channelwise(h).permute(0, 3, 1, 2), g[5])  # (B, C, H, W)


class Codebook(nn.Module):
    """Holds the VQ codebook (``embedding.weight``: (num_vq_embeddings, latent_channels))."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(size, dim)


def _tiles(size: int, tile: int, margin: int) -> Iterator[tuple[int, int, int, int]]:
    """Along one axis: each tile's (start, stop) and its window (start, stop) with the margin."""
    for start in range(0, size, tile):
        stop = min(start + tile, size)
        yield start, stop, max(start - margin, 0), min(stop + margin, size)


def _checked_tile(tile_size: int) -> int:
    if tile_size < 1:
        raise ValueError(f"tile_size must be a positive number of latent pixels, got {tile_size}")
    return tile_size


def _encoder(config: VQConfig, widths: list[int]) -> nn.Sequential:
    """One block per level (shallow to deep), strided 4×4 convs between, then the latent projection."""
    layers: list[nn.Module] = []
    for level, width in enumerate(widths):
        if level > 0:
            layers.append(nn.Conv2d(widths[level - 1], width, kernel_size=4, stride=2, padding=1))
        layers.append(MixingBlock(width))
    project = nn.Conv2d(widths[-1], config.latent_channels, kernel_size=1, bias=False)
    layers.append(nn.Sequential(project, nn.BatchNorm2d(config.latent_channels)))
    return nn.Sequential(*layers)


def _decoder(config: VQConfig, widths: list[int]) -> nn.Sequential:
    """Latent projection, ``bottleneck_blocks`` blocks at the deepest level, then one block per level."""
    deep_first = widths[::-1]
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(config.latent_channels, deep_first[0], kernel_size=1))]
    for level, width in enumerate(deep_first):
        layers.extend(MixingBlock(width) for _ in range(config.bottleneck_blocks if level == 0 else 1))
        if level + 1 < len(deep_first):
            up = nn.ConvTranspose2d(width, deep_first[level + 1], kernel_size=4, stride=2, padding=1)
            layers.append(up)
    return nn.Sequential(*layers)


class PaellaVQModel(PretrainedModel):
    """Stage A autoencoder with diffusers' ``PaellaVQModel`` constructor arguments and weights layout."""

    config_class = VQConfig
    config: VQConfig

    def __init__(self, config: VQConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = self.resolve_config(config, kwargs)
        cfg = self.config
        if cfg.levels < 1 or cfg.up_down_scale_factor < 1:
            raise ValueError(
                f"levels and up_down_scale_factor must be at least 1, got {cfg.levels} and "
                f"{cfg.up_down_scale_factor}"
            )
        widths = [cfg.embed_dim // 2**i for i in reversed(range(cfg.levels))]  # shallow to deep
        pixels = cfg.up_down_scale_factor**2
        self.in_block = nn.Sequential(
            nn.PixelUnshuffle(cfg.up_down_scale_factor),
            nn.Conv2d(cfg.in_channels * pixels, widths[0], kernel_size=1),
        )
        self.down_blocks = _encoder(cfg, widths)
        self.vquantizer = Codebook(cfg.num_vq_embeddings, cfg.latent_channels)
        self.up_blocks = _decoder(cfg, widths)
        self.tile_size: int | None = None  # see enable_tiling
        self.out_block = nn.Sequential(
            nn.Conv2d(widths[0], cfg.out_channels * pixels, kernel_size=1),
            nn.PixelShuffle(cfg.up_down_scale_factor),
        )

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> VQConfig:
        """Inferred from the shapes; ``scale_factor`` 0.43, the original Stage A file's latent scale."""
        return vq_config_from_single_file(state_dict, source)

    @classmethod
    def convert_single_file(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return vq_state_dict_from_single_file(state_dict)

    def to_single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the original ``stage_a.safetensors`` keys."""
        return to_original_state_dict(self.state_dict(), Kind.STAGE_A)

    @property
    def downscale(self) -> int:
        """Image side / latent side."""
        return self.config.up_down_scale_factor * 2 ** (self.config.levels - 1)

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> VQEncoderOutput | tuple[torch.Tensor]:
        """Images (B, 3, H, W) in [0, 1] → continuous latents (B, 4, H/4, W/4), not quantised."""
        latents = self._encode(x)
        return VQEncoderOutput(latents) if return_dict else (latents,)

    def decode(
        self,
        latents: torch.Tensor,
        force_not_quantize: bool = True,
        return_dict: bool = True,
        tile_size: int | None = None,
    ) -> DecoderOutput | tuple[torch.Tensor]:
        """Latents (B, 4, h, w) → images (B, 3, 4h, 4w); snapped to the codebook first unless
        ``force_not_quantize`` (the default, as in diffusers and the original inference code).

        ``tile_size`` (latent pixels) decodes in tiles for this call, overriding :meth:`enable_tiling`.
        """
        latents = latents if force_not_quantize else self.quantize(latents)
        tile_size = self.tile_size if tile_size is None else _checked_tile(tile_size)
        sample = self._decode(latents) if tile_size is None else self._decode_tiled(latents, tile_size)
        return DecoderOutput(sample) if return_dict else (sample,)

    def enable_tiling(self, tile_size: int = 64) -> None:
        """Decode one image and one ``tile_size``² latent tile at a time, bounding peak memory.

        Each tile is decoded with a margin of :attr:`decoder_reach` neighbouring latent pixels and
        cropped, so the result is the untiled decode's (up to float rounding), without seams; the
        margins cost extra compute (about 1.5x for 128-pixel tiles of the released model).
        """
        self.tile_size = _checked_tile(tile_size)

    def disable_tiling(self) -> None:
        self.tile_size = None

    @property
    def decoder_reach(self) -> int:
        """How far (in latent pixels, each side) the decoder looks: an output pixel depends on no latent
        farther away. One per 3×3 depthwise block at the latent level; at most two per upsampling
        level (its 4×4 transposed conv, then a block at twice the resolution)."""
        return self.config.bottleneck_blocks + 2 * (self.config.levels - 1)

    def forward(self, sample: torch.Tensor, return_dict: bool = True) -> DecoderOutput | tuple[torch.Tensor]:
        """Reconstruction ``decode(encode(sample))`` without quantisation."""
        reconstruction = self._decode(self._encode(sample))
        return DecoderOutput(reconstruction) if return_dict else (reconstruction,)

    def _encode(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W)
        self._check_images(x)
        h = self.in_block(x).contiguous(memory_format=torch.channels_last)  # (B, c0, H/2, W/2)
        return self.down_blocks(h).contiguous()  # (B, latent_channels, H/4, W/4)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:  # (B, latent_channels, h, w)
        self._check_latents(latents)
        h = self.up_blocks(latents.contiguous(memory_format=torch.channels_last))  # (B, c0, 2h, 2w)
        return self.out_block(h).contiguous()  # (B, out_channels, 4h, 4w)

    def _decode_tiled(self, latents: torch.Tensor, tile: int) -> torch.Tensor:
        self._check_latents(latents)
        f, margin = self.downscale, self.decoder_reach
        b, _, h, w = latents.shape
        out = latents.new_empty(b, self.config.out_channels, h * f, w * f)
        for i in range(b):
            for top, bottom, y0, y1 in _tiles(h, tile, margin):
                for left, right, x0, x1 in _tiles(w, tile, margin):
                    piece = self._decode(latents[i : i + 1, :, y0:y1, x0:x1])[0]  # (C, f(y1-y0), f(x1-x0))
                    crop = piece[:, (top - y0) * f : (bottom - y0) * f, (left - x0) * f : (right - x0) * f]
                    out[i, :, top * f : bottom * f, left * f : right * f] = crop
        return out

    def quantize(self, latents: torch.Tensor) -> torch.Tensor:
        """Each latent vector replaced by its nearest (Euclidean) codebook entry."""
        self._check_latents(latents)
        codebook = self.vquantizer.embedding.weight  # (N, C)
        b, c, h, w = latents.shape
        flat = latents.permute(0, 2, 3, 1).reshape(-1, c)  # (B·h·w, C)
        index = torch.cdist(flat.float(), codebook.float()).argmin(dim=1)
        return codebook[index].view(b, h, w, c).permute(0, 3, 1, 2).to(latents.dtype)  # (B, C, h, w)

    def _check_images(self, x: torch.Tensor) -> None:
        c = self.config.in_channels
        if x.ndim != 4 or x.shape[1] != c:
            raise ValueError(
                f"expected images with {c} channels (B,{c},H,W), got a tensor of shape {tuple(x.shape)}"
            )
        f = self.downscale
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(
                f"expected images (B,{c},H,W) with H and W multiples of {f}, "
                f"got {x.shape[-2]}×{x.shape[-1]}; resize or pad the images"
            )

    def _check_latents(self, latents: torch.Tensor) -> None:
        c = self.config.latent_channels
        if latents.ndim != 4 or latents.shape[1] != c:
            raise ValueError(
                f"expected latents with {c} channels (B,{c},h,w), got a tensor of shape "
                f"{tuple(latents.shape)}"
            )
