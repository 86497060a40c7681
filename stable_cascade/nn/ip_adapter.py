"""IP-Adapter for Stage C: image prompts as extra tokens that Stage C's attention blocks attend to apart.

As Ye et al.'s IP-Adapter for Stable Diffusion: an image projection turns each image prompt into
``num_tokens`` tokens of the prior's conditioning width (``image_proj``: a linear map of the CLIP image
embedding and a layer norm, or, for patch tokens, a small perceiver resampler), and every attention
block gets its own key and value projections of them (``ip_adapter.<k>``, block ``k`` of the forward
pass). Decoupled attention: a block's queries attend to its usual keys and values (pixels and CLIP
tokens) and, separately, to the image tokens' keys and values; the second result, times the adapter's
scale, is added to the first before the block's output projection. The base model stays as it is:
an adapter is attached to a UNet (not registered as its submodule, so the UNet's state dict never
holds it) and detached again, and at scale 0 its branch is skipped, so the output is the base
model's bit for bit.

Stage C's blocks map CLIP tokens with ``kv_mapper`` (SiLU, linear) before their key and value
projections; an adapter's projections take ``SiLU(tokens)`` and start as the product of the two
linear maps, so a fresh adapter attends to its tokens as the block attends to CLIP tokens.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Protocol, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from stable_cascade.nn.layers import AttnBlock, IPKeyValues
from stable_cascade.specs import UNetConfig
from stable_cascade.specs.ip_adapter import IPAdapterConfig

__all__ = [
    "IPAdapter",
    "IPAdapterConfig",
    "attach_ip_adapter",
    "attention_blocks",
    "check_fits",
    "detach_ip_adapters",
    "ip_key_values",
    "new_ip_adapter",
]


class ImageProjection(nn.Module):
    """CLIP image embeddings (B, N, C) → ``num_tokens`` tokens per image (B, N·T, c_cond)."""

    def __init__(self, config: IPAdapterConfig) -> None:
        super().__init__()
        self.tokens = config.num_tokens
        self.proj = nn.Linear(config.image_dim, config.num_tokens * config.conditioning_dim)
        self.norm = nn.LayerNorm(config.conditioning_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        b, n, _ = embeds.shape
        return cast(Tensor, self.norm(self.proj(embeds).view(b, n * self.tokens, -1)))


class PerceiverAttention(nn.Module):
    """Learned latents attend to the image's patch tokens and to themselves (IP-Adapter Plus)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.to_q = nn.Linear(width, width, bias=False)
        self.to_kv = nn.Linear(width, 2 * width, bias=False)
        self.to_out = nn.Linear(width, width, bias=False)

    def forward(self, patches: Tensor, latents: Tensor) -> Tensor:
        b, t, width = latents.shape
        latents_normed = self.norm2(latents)
        context = torch.cat([self.norm1(patches), latents_normed], dim=1)  # (B, P + T, W)
        q = self.to_q(latents_normed).view(b, t, self.heads, -1).transpose(1, 2)
        k, v = (
            x.view(b, -1, self.heads, width // self.heads).transpose(1, 2)
            for x in self.to_kv(context).chunk(2, -1)
        )
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, width)
        return cast(Tensor, self.to_out(out))


class Resampler(nn.Module):
    """Patch tokens (B, N, P, C) → ``num_tokens`` tokens per image (B, N·T, c_cond): learned latents
    refined by ``resampler_depth`` perceiver attention + feed-forward layers."""

    def __init__(self, config: IPAdapterConfig) -> None:
        super().__init__()
        width = config.resampler_width
        self.latents = nn.Parameter(torch.randn(1, config.num_tokens, width) / width**0.5)
        self.proj_in = nn.Linear(config.image_dim, width)
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(width, config.resampler_heads),
                    nn.Sequential(
                        nn.LayerNorm(width),
                        nn.Linear(width, 4 * width, bias=False),
                        nn.GELU(),
                        nn.Linear(4 * width, width, bias=False),
                    ),
                ]
            )
            for _ in range(config.resampler_depth)
        )
        self.proj_out = nn.Linear(width, config.conditioning_dim)
        self.norm_out = nn.LayerNorm(config.conditioning_dim)

    def forward(self, patches: Tensor) -> Tensor:
        b, n, p, _ = patches.shape
        x = self.proj_in(patches.reshape(b * n, p, -1))  # (B·N, P, W)
        latents = self.latents.expand(b * n, -1, -1)
        for attention, feed_forward in cast(Iterator[nn.ModuleList], self.layers):
            latents = attention(x, latents) + latents
            latents = feed_forward(latents) + latents
        tokens = self.norm_out(self.proj_out(latents))  # (B·N, T, c_cond)
        return cast(Tensor, tokens.reshape(b, n * tokens.shape[1], -1))


class IPAttention(nn.Module):
    """One attention block's key and value projections of the image tokens."""

    def __init__(self, c_cond: int, inner: int) -> None:
        super().__init__()
        self.to_k_ip = nn.Linear(c_cond, inner)
        self.to_v_ip = nn.Linear(c_cond, inner)

    def forward(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        context = F.silu(tokens)  # as the block's kv_mapper starts
        return self.to_k_ip(context), self.to_v_ip(context)


class IPAdapter(nn.Module):
    """``image_proj`` and one :class:`IPAttention` per attention block (``ip_adapter``)."""

    def __init__(self, config: IPAdapterConfig) -> None:
        super().__init__()
        self.config = config
        self.image_proj: nn.Module = (
            ImageProjection(config) if config.input == "embeds" else Resampler(config)
        )
        self.ip_adapter = nn.ModuleList(
            IPAttention(config.conditioning_dim, inner) for inner in config.inner_dims
        )

    def key_values(self, image: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Every block's image keys and values (B, N·T, inner) for the adapter's input ``image``: CLIP
        image embeddings (B, N, C) or patch tokens (B, N, P, C)."""
        cfg = self.config
        ndim, shape = (3, "(B, N, {})") if cfg.input == "embeds" else (4, "(B, N, P, {})")
        if image.ndim != ndim or image.shape[-1] != cfg.image_dim:
            raise ValueError(
                f"this IP-Adapter takes image {cfg.input} of shape {shape.format(cfg.image_dim)}, got "
                f"{tuple(image.shape)}; use the image encoder it was trained with"
            )
        tokens = self.image_proj(image)
        return [cast(tuple[Tensor, Tensor], block(tokens)) for block in self.ip_adapter]


class HasIPAdapters(Protocol):
    """A UNet that IP-Adapters attach to: its attached adapters by name, with their scales."""

    ip_adapters: dict[str, tuple[IPAdapter, float]]
    config: UNetConfig

    def modules(self) -> Iterator[nn.Module]: ...


def attention_blocks(unet: HasIPAdapters) -> list[AttnBlock]:
    """The UNet's attention blocks in the forward pass's order (down levels, then up levels)."""
    return [module for module in unet.modules() if isinstance(module, AttnBlock)]


def _inner(block: AttnBlock) -> int:
    return block.attention.to_k.out_features


def new_ip_adapter(
    unet: HasIPAdapters,
    image_dim: int,
    *,
    num_tokens: int = 4,
    input: str = "embeds",
    seed: int = 0,
) -> IPAdapter:
    """A fresh adapter sized to ``unet`` (a Stage C) for ``image_dim`` wide inputs; every block's key and
    value projections start as ``to_k ∘ kv_mapper`` of the block (see the module's docstring)."""
    if unet.config.is_stage_b:
        raise ValueError("IP-Adapters are for Stage C (the prior); this UNet is a Stage B")
    blocks = attention_blocks(unet)
    config = IPAdapterConfig(
        image_dim=image_dim,
        conditioning_dim=unet.config.conditioning_dim,
        inner_dims=tuple(_inner(block) for block in blocks),
        num_tokens=num_tokens,
        input=input,  # type: ignore[arg-type]  # checked by the config
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = IPAdapter(config)
    with torch.no_grad():
        for block, ip in zip(blocks, cast(Iterator[IPAttention], adapter.ip_adapter), strict=True):
            mapper = cast(nn.Linear, block.kv_mapper[1])
            for ours, theirs in ((ip.to_k_ip, block.attention.to_k), (ip.to_v_ip, block.attention.to_v)):
                ours.weight.copy_(theirs.weight.float() @ mapper.weight.float())
                ours.bias.copy_(theirs.weight.float() @ mapper.bias.float() + theirs.bias.float())
    return adapter


def check_fits(config: IPAdapterConfig, unet: HasIPAdapters, source: str) -> None:
    """A one-line ``ValueError`` when the adapter ``source`` is for another Stage C architecture."""
    expected = tuple(_inner(block) for block in attention_blocks(unet))
    if unet.config.is_stage_b:
        raise ValueError(f"IP-Adapter {source} is for Stage C; it cannot attach to a Stage B")
    if (config.conditioning_dim, config.inner_dims) != (unet.config.conditioning_dim, expected):
        raise ValueError(
            f"IP-Adapter {source} is for another Stage C architecture: it has {len(config.inner_dims)} "
            f"attention blocks of widths {sorted(set(config.inner_dims))} on {config.conditioning_dim}-wide "
            f"tokens, this prior {len(expected)} of widths {sorted(set(expected))} on "
            f"{unet.config.conditioning_dim}-wide tokens; use an IP-Adapter trained for this prior"
        )


def attach_ip_adapter(unet: HasIPAdapters, adapter: IPAdapter, name: str, scale: float) -> None:
    """Attach ``adapter`` to ``unet`` as ``name`` at ``scale`` (checked to fit)."""
    check_fits(adapter.config, unet, name)
    if name in unet.ip_adapters:
        raise ValueError(f"an IP-Adapter named {name!r} is already attached; pass another name")
    unet.ip_adapters[name] = (adapter.eval().requires_grad_(False), float(scale))


def detach_ip_adapters(unet: HasIPAdapters, names: list[str] | None = None) -> None:
    """Detach the named adapters (all with None); the UNet is then exactly as before attaching."""
    for name in list(unet.ip_adapters) if names is None else names:
        unet.ip_adapters.pop(name, None)


def ip_key_values(unet: HasIPAdapters, image: Tensor | None, like: Tensor) -> Iterator[IPKeyValues]:
    """Per attention block of ``unet``, each attached adapter's ``(key, value, scale)`` for their input
    ``image`` (one row per row of ``like``, the CLIP tokens, on whose device they run, in their own
    dtype); nothing for any block without an image or with every adapter at scale 0 (the base model,
    exactly)."""
    if image is not None and not unet.ip_adapters:
        raise ValueError("ip_image needs an attached IP-Adapter (attach one, or leave ip_image out)")
    active = [(adapter, scale) for adapter, scale in unet.ip_adapters.values() if scale != 0]
    if image is None or not active:
        return itertools.repeat(())
    if image.shape[0] != like.shape[0]:
        raise ValueError(f"ip_image has batch size {image.shape[0]} but the conditioning has {like.shape[0]}")
    per_adapter = []
    for adapter, scale in active:
        weight = next(adapter.parameters())
        if weight.device != like.device:  # the prior moved since attaching (offload, .to)
            adapter.to(like.device)
        per_adapter.append((adapter.key_values(image.to(like.device, weight.dtype)), scale))
    blocks = len(per_adapter[0][0])
    return iter([tuple((*rows[i], scale) for rows, scale in per_adapter) for i in range(blocks)])
