"""The Stable Cascade UNet: one class for Stage C (the prior) and Stage B (the decoder).

Matches diffusers' ``StableCascadeUNet`` in constructor arguments, state-dict keys and numerics,
and fixes its per-sample ``sca``/``crp`` handling (diffusers fails for batches larger than one).

A sampling loop calls :meth:`StableCascadeUNet.prepare` once per generation, then
``unet(sample, ratio, cache=cache)`` per step; ``unet(sample, ratio, **conditioning)`` prepares a
cache for that one call, so both give the same result.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from stable_cascade.checkpoint import PretrainedModel
from stable_cascade.convert import (
    Kind,
    to_original_state_dict,
    unet_config_from_single_file,
    unet_state_dict_from_single_file,
)
from stable_cascade.nn.checks import check_conditioning, check_dtypes, check_sample
from stable_cascade.nn.ip_adapter import IPAdapter, ip_key_values
from stable_cascade.nn.layers import (
    AttnBlock,
    BlockState,
    IPKeyValues,
    LayerNorm2d,
    ResBlock,
    TensorLike,
    TimestepBlock,
    UpDownBlock2d,
    condition_embeddings,
    conditioning_mapper,
    per_sample,
    resize_like,
    set_fast_math,
    timestep_embedding,
)
from stable_cascade.nn.speed import SpeedSwitches
from stable_cascade.nn.unet_state import (
    LevelStates,
    StableCascadeUNetOutput,
    UNetCache,
    added_conditioning,
    check_residuals,
)
from stable_cascade.specs import BlockType, UNetConfig

__all__ = ["StableCascadeUNet", "StableCascadeUNetOutput", "UNetCache"]


class StableCascadeUNet(SpeedSwitches, PretrainedModel):
    """ε-predicting UNet of Stage B / Stage C; ``StableCascadeUNet(**diffusers_config)`` or from a config.

    Mixed precision: Stage C keeps its last up level and ``clf`` in float32 whenever the rest of the
    model is float16 (:meth:`enable_fp16_safety`). Speed: :meth:`set_fast_math`, :meth:`compile`,
    :meth:`enable_cuda_graphs`.
    """

    config_class = UNetConfig
    config: UNetConfig

    def __init__(self, config: UNetConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = self.resolve_config(config, kwargs)
        self.fp16_safety: torch.dtype | None = None if cfg.is_stage_b else torch.float32
        c0 = cfg.block_out_channels[0]
        if cfg.effnet_in_channels is not None:
            self.effnet_mapper = conditioning_mapper(cfg.effnet_in_channels, c0)
        if cfg.pixel_mapper_in_channels is not None:
            self.pixels_mapper = conditioning_mapper(cfg.pixel_mapper_in_channels, c0)
        self.clip_txt_pooled_mapper = nn.Linear(
            cfg.clip_text_pooled_in_channels, cfg.conditioning_dim * cfg.clip_seq
        )
        if cfg.clip_text_in_channels is not None:
            self.clip_txt_mapper = nn.Linear(cfg.clip_text_in_channels, cfg.conditioning_dim)
        if cfg.clip_image_in_channels is not None:
            self.clip_img_mapper = nn.Linear(cfg.clip_image_in_channels, cfg.conditioning_dim * cfg.clip_seq)
        self.clip_norm = nn.LayerNorm(cfg.conditioning_dim, elementwise_affine=False, eps=1e-6)
        p = cfg.patch_size
        self.embedding = nn.Sequential(
            nn.PixelUnshuffle(p), nn.Conv2d(cfg.in_channels * p * p, c0, kernel_size=1), LayerNorm2d()
        )
        levels = range(len(cfg.block_out_channels))
        self.down_downscalers = nn.ModuleList(self._resampler(i, "down") for i in levels)
        self.down_blocks = nn.ModuleList(self._level(i, "down") for i in levels)
        self.down_repeat_mappers = nn.ModuleList(self._repeat_mappers(i, "down") for i in levels)
        self.up_blocks = nn.ModuleList(self._level(i, "up") for i in reversed(levels))
        self.up_upscalers = nn.ModuleList(self._resampler(i, "up") for i in reversed(levels))
        self.up_repeat_mappers = nn.ModuleList(self._repeat_mappers(i, "up") for i in reversed(levels))
        self.clf = nn.Sequential(
            LayerNorm2d(), nn.Conv2d(c0, cfg.out_channels * p * p, kernel_size=1), nn.PixelShuffle(p)
        )
        self.gradient_checkpointing = False
        self.ip_adapters: dict[str, tuple[IPAdapter, float]] = {}  # attached, not submodules

    # -- construction -------------------------------------------------------------------------------

    def _level(self, i: int, direction: str) -> nn.ModuleList:
        cfg = self.config
        c = cfg.block_out_channels[i]
        layers = (
            cfg.down_num_layers_per_block if direction == "down" else cfg.up_num_layers_per_block[::-1]
        )[i]
        # In the up path the very first block of every level but the deepest takes the skip.
        takes_skip = direction == "up" and i < len(cfg.block_out_channels) - 1
        blocks: list[nn.Module] = []
        for _ in range(layers):
            for kind in cfg.block_types_per_layer[i]:
                c_skip = c if takes_skip and not blocks else 0
                blocks.append(self._block(kind, i, c_skip))
        return nn.ModuleList(blocks)

    def _block(self, kind: BlockType, i: int, c_skip: int) -> nn.Module:
        cfg = self.config
        c, dropout = cfg.block_out_channels[i], cfg.dropout[i]
        if kind is BlockType.RES:
            return ResBlock(c, c_skip, cfg.kernel_size, dropout)
        if kind is BlockType.TIMESTEP:
            return TimestepBlock(c, cfg.timestep_ratio_embedding_dim, cfg.timestep_conditioning_type)
        heads, self_attn = cfg.num_attention_heads[i], cfg.self_attn[i]
        return AttnBlock(c, cfg.conditioning_dim, heads, self_attn, dropout)

    def _resampler(self, i: int, direction: str) -> nn.Module:
        """Level transition: strided (transposed) conv for Stage B, 1x1 ``UpDownBlock2d`` for Stage C."""
        if i == 0:
            return nn.Identity()
        cfg = self.config
        c_hi, c_lo = cfg.block_out_channels[i - 1], cfg.block_out_channels[i]
        c_in, c_out = (c_hi, c_lo) if direction == "down" else (c_lo, c_hi)
        resample: nn.Module
        if cfg.switch_level is not None:
            resample = UpDownBlock2d(c_in, c_out, direction, enabled=cfg.switch_level[i - 1])
        elif direction == "down":
            resample = nn.Conv2d(c_in, c_out, kernel_size=2, stride=2)
        else:
            resample = nn.ConvTranspose2d(c_in, c_out, kernel_size=2, stride=2)
        return nn.Sequential(LayerNorm2d(), resample)

    def _repeat_mappers(self, i: int, direction: str) -> nn.ModuleList:
        c = self.config.block_out_channels[i]
        repeats = self.config.repeats(direction)[i]  # type: ignore[arg-type]
        return nn.ModuleList(nn.Conv2d(c, c, kernel_size=1) for _ in range(repeats - 1))

    # -- forward ----------------------------------------------------------------------------------

    def forward(
        self,
        sample: torch.Tensor,
        timestep_ratio: TensorLike,
        clip_text_pooled: torch.Tensor | None = None,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        sca: TensorLike | None = None,
        crp: TensorLike | None = None,
        return_dict: bool = True,
        cache: UNetCache | None = None,
        controlnet_residuals: Sequence[torch.Tensor | None] | None = None,
        guidance: TensorLike | None = None,
        ip_image: torch.Tensor | None = None,
    ) -> StableCascadeUNetOutput | tuple[torch.Tensor]:
        """Predict the noise in ``sample`` (B, in_channels, H, W) at ``timestep_ratio`` (scalar or (B,)).

        Pass the conditioning (as diffusers' ``StableCascadeUNet``) or a ``cache`` from :meth:`prepare`,
        not both. ``sca``/``crp`` may be scalars or one value per sample; missing ones are embedded as
        0, as in the original. Stage C without ``clip_img`` uses one zero image embedding, as the
        pipelines do. ``controlnet_residuals``: a ControlNet's output (``nn/unet_state.py``); ``guidance``,
        ``ip_image``: the guidance embedding's CFG scale and the IP-Adapters' input (see :meth:`prepare`)."""
        check_sample(self.config, sample)
        check_dtypes(self.config, self.dtype, {"sample": sample})
        conditioning = (clip_text_pooled, clip_text, clip_img, effnet, pixels, sca, crp)
        if cache is None:
            if clip_text_pooled is None:
                raise ValueError("pass clip_text_pooled (and the stage's other conditioning) or a cache")
            cache = self.prepare(sample.shape[-2:], *conditioning, guidance=guidance, ip_image=ip_image)  # type: ignore[arg-type]
            what = f"clip_text_pooled has batch size {cache.batch} but sample has {sample.shape[0]}"
        elif any(v is not None for v in (*conditioning, ip_image)):
            raise ValueError("pass either the conditioning or a cache prepared from it, not both")
        else:
            what = (f"the cache was prepared for {cache.batch} sample(s) of size {cache.size[0]}x"
                    f"{cache.size[1]}, got sample of shape {tuple(sample.shape)}; prepare it for the batch "
                    "the UNet is called on (with classifier-free guidance: the doubled batch)")  # fmt: skip
        if cache.batch != sample.shape[0] or cache.size != tuple(sample.shape[-2:]):
            raise ValueError(what)
        if controlnet_residuals is not None:
            down, up = check_residuals(self.config, controlnet_residuals, sample.shape[0])
            cache = dataclasses.replace(cache, control_down=down, control_up=up)
        denoise = self._compiled_denoise or self._denoise
        if graphed := self.graphed(("denoise", denoise), denoise, invariant=(2,)):
            timestep_ratio = per_sample(timestep_ratio, sample.shape[0], sample.device)  # a tensor input
            denoise = graphed
        out = denoise(sample, timestep_ratio, cache)
        return StableCascadeUNetOutput(sample=out) if return_dict else (out,)

    def prepare(
        self,
        size: tuple[int, int] | torch.Size,
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        sca: TensorLike | None = None,
        crp: TensorLike | None = None,
        controlnet_residuals: Sequence[torch.Tensor | None] | None = None,
        guidance: TensorLike | None = None,
        ip_image: torch.Tensor | None = None,
    ) -> UNetCache:
        """The step-invariant work for samples of spatial ``size`` (H, W) with this conditioning.

        Computes the normalised CLIP tokens, every attention block's CLIP keys and values, every timestep
        block's ``sca``/``crp`` modulation, and Stage B's ``effnet_mapper(resize(effnet))`` + ``resize(
        pixels_mapper(pixels))`` (each ignored without its mapper, as diffusers); batch: clip_text_pooled's.
        ``guidance``: the CFG scale of a UNet with a ``guidance`` condition (``condition_embeddings``).
        With IP-Adapters attached, also their image tokens' keys and values of ``ip_image``."""
        cfg, batch = self.config, clip_text_pooled.shape[0]
        self.start_generation(clip_text_pooled)  # packs CPU attention weights, drops stale CUDA graphs
        effnet = effnet if cfg.effnet_in_channels is not None else None  # no mapper: ignored, as pixels
        inputs = {"clip_text_pooled": clip_text_pooled, "clip_text": clip_text, "clip_img": clip_img}
        mapped_pixels = pixels if cfg.pixel_mapper_in_channels is not None else None  # else ignored
        check_dtypes(cfg, self.dtype, {**inputs, "effnet": effnet, "pixels": mapped_pixels})
        check_conditioning(cfg, clip_text_pooled, clip_text, clip_img, effnet)
        height, width = int(size[0]), int(size[1])
        clip = self.clip_tokens(clip_text_pooled, clip_text, clip_img)  # (B, L, c_cond)
        conds = condition_embeddings(cfg, {"sca": sca, "crp": crp, "guidance": guidance}, batch, clip.device)
        embedded_size = (height // cfg.patch_size, width // cfg.patch_size)
        added = added_conditioning(self, effnet, pixels, batch, embedded_size, clip)
        ip = ip_key_values(self, ip_image, clip)  # per attention block, in the order of the levels
        down = tuple(self._prepare_level(blocks, clip, conds, ip) for blocks in self.down_blocks)
        up = tuple(self._prepare_level(blocks, clip, conds, ip) for blocks in self.up_blocks)
        residuals = check_residuals(cfg, controlnet_residuals, batch) if controlnet_residuals else ((), ())
        return UNetCache(batch, (height, width), added, down, up, *residuals)

    def clip_tokens(
        self, pooled: torch.Tensor, text: torch.Tensor | None = None, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised CLIP tokens: Stage C ``[text | 4 pooled | 4 per image]``, Stage B ``[4 pooled]``."""
        if pooled.ndim == 2:
            pooled = pooled[:, None]  # (B, 1, C)
        b, seq = pooled.shape[0], self.config.clip_seq
        tokens = self.clip_txt_pooled_mapper(pooled).view(b, pooled.shape[1] * seq, -1)
        if text is not None:
            parts = [self.clip_txt_mapper(text), tokens]
            if self.config.clip_image_in_channels is not None:  # a Stage C without it has no image tokens
                image = pooled.new_zeros(b, 1, self.config.clip_image_in_channels) if image is None else image
                image = image[:, None] if image.ndim == 2 else image  # (B, n, C)
                parts.append(self.clip_img_mapper(image).view(b, image.shape[1] * seq, -1))
            tokens = torch.cat(parts, dim=1)
        return self.clip_norm(tokens)  # (B, L, c_cond)

    def _prepare_level(
        self, blocks: nn.Module, clip: Tensor, cond_embeddings: Tensor, ip: Iterator[IPKeyValues]
    ) -> LevelStates:
        dtype = _dtype_of(blocks, clip.dtype)  # the level's own dtype (see enable_fp16_safety)
        states: list[BlockState] = []
        for block in cast(nn.ModuleList, blocks):
            if isinstance(block, AttnBlock):
                states.append(block.prepare(clip.to(dtype), next(ip)))
            elif isinstance(block, TimestepBlock):
                states.append(block.prepare(cond_embeddings.to(dtype)))
            else:
                states.append(None)
        return tuple(states)

    def _denoise(self, sample: torch.Tensor, timestep_ratio: TensorLike, cache: UNetCache) -> torch.Tensor:
        """The per-step pass: embedding, down and up paths, output head."""
        r = per_sample(timestep_ratio, sample.shape[0], sample.device)
        r_embed = timestep_embedding(r, self.config.timestep_ratio_embedding_dim)  # (B, 64)
        # (B, c0, H/p, W/p), channels-last from here on (the embedding's layer norm already is).
        x = self.embedding(sample).contiguous(memory_format=torch.channels_last)
        for term in cache.added:  # added one by one, in the reference's order
            x = x + term
        skips = self._down(x, r_embed, cache)
        x = self._up(skips, r_embed, cache)
        return cast(torch.Tensor, self.clf(x.to(_dtype_of(self.clf, x.dtype)))).to(sample.dtype)

    def _run_level(
        self, level: int, direction: str, x: Tensor, r_embed: Tensor, cache: UNetCache, skip: Tensor | None
    ) -> Tensor:
        down = direction == "down"
        states = (cache.down if down else cache.up)[level]
        control = cache.control_down if down else cache.control_up
        blocks = cast(nn.ModuleList, (self.down_blocks if down else self.up_blocks)[level])
        mappers = cast(nn.ModuleList, (self.down_repeat_mappers if down else self.up_repeat_mappers)[level])
        dtype = _dtype_of((blocks, mappers), x.dtype)  # the model's, or one kept by enable_fp16_safety
        x, r_embed = x.to(dtype), r_embed.to(dtype)  # no-ops unless the dtypes differ
        skip = None if skip is None else skip.to(dtype)
        calls = iter(control[level] if control else ())  # ControlNet residuals, one per ResBlock call
        for repeat in range(len(mappers) + 1):
            for k, block in enumerate(blocks):
                if isinstance(block, ResBlock):
                    block_skip = skip if k == 0 else None
                    if block_skip is not None:
                        x = resize_like(x, block_skip.shape[-2:])  # odd sizes: match the skip first
                    if (residual := next(calls, None)) is not None:  # added after that resize
                        x = x + resize_like(residual, x.shape[-2:]).to(x.dtype)
                    x = self._call(block, x) if block_skip is None else self._call(block, x, block_skip)
                elif isinstance(block, TimestepBlock):
                    x = self._call(block, x, r_embed, states[k])
                else:
                    x = self._call(block, x, states[k])
            if repeat < len(mappers):
                x = mappers[repeat](x)
        return x

    def _call(self, block: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)  # type: ignore[no-any-return]
        return block(x, *args)  # type: ignore[no-any-return]

    def _down(self, x: Tensor, r_embed: Tensor, cache: UNetCache) -> list[Tensor]:
        """Each down level's output, deepest first."""
        outputs: list[torch.Tensor] = []
        for level, downscaler in enumerate(self.down_downscalers):
            x = self._run_level(level, "down", downscaler(x), r_embed, cache, None)
            outputs.insert(0, x)
        return outputs

    def _up(self, skips: list[Tensor], r_embed: Tensor, cache: UNetCache) -> Tensor:
        x = skips[0]
        for level, upscaler in enumerate(self.up_upscalers):
            skip = skips[level] if level > 0 else None
            x = upscaler(self._run_level(level, "up", x, r_embed, cache, skip))
        return x

    # -- speed and precision ------------------------------------------------------------------------

    def set_fast_math(self, enabled: bool = True) -> None:
        """Fuse the GRN and timestep modulation passes (faster; no longer bit-identical to diffusers,
        whose op order the default keeps, but as accurate: differences are float rounding)."""
        set_fast_math(self, enabled)

    def enable_fp16_safety(self, dtype: torch.dtype = torch.float32) -> None:
        """Keep the last up level and ``clf`` in ``dtype`` (float32 or bfloat16) while the model is float16.

        The full Stage C overflows float16 in the block group that runs last (activations
        beyond 65504 give NaN, black images). Those modules' weights are held in ``dtype``, the hidden
        state is cast on entry and the output back. Applied now and on every dtype change (``.to``,
        ``.half()``, ``from_pretrained(torch_dtype=…)``); inert unless the model is float16. Stage C
        has it on (float32) by default; bfloat16 costs no memory and is faster where GPUs support it.
        """
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"fp16 safety needs torch.float32 or torch.bfloat16, got {dtype}")
        self.fp16_safety = dtype
        self._apply_precision_policy()

    def disable_fp16_safety(self) -> None:
        """Run every module in the model's dtype (Stage B's default)."""
        self.fp16_safety = None
        self._apply_precision_policy()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> StableCascadeUNet:
        super()._apply(fn, recurse)
        self._apply_precision_policy()
        return self

    def _apply_precision_policy(self) -> None:
        dtype = cast(nn.Conv2d, self.embedding[1]).weight.dtype  # the model's dtype
        if dtype == torch.float16 and self.fp16_safety is not None:
            dtype = self.fp16_safety
        for module in (self.up_blocks[-1], self.up_repeat_mappers[-1], self.clf):
            module.to(dtype)

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> UNetConfig:
        """Inferred from the shapes of an original, diffusers-layout or ComfyUI-bundle file."""
        return unet_config_from_single_file(state_dict, source)

    @classmethod
    def convert_single_file(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return unet_state_dict_from_single_file(state_dict)

    def to_single_file_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights under the original single-file keys (``stage_b.safetensors`` / ``stage_c…``)."""
        kind = Kind.STAGE_B if self.config.is_stage_b else Kind.STAGE_C
        return to_original_state_dict(self.state_dict(), kind)

    def enable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False


def _dtype_of(modules: nn.Module | tuple[nn.Module, ...], default: torch.dtype) -> torch.dtype:
    """The dtype of the first parameter of ``modules``; ``default`` when they have none (an empty level)."""
    parameters = (p for m in (modules if isinstance(modules, tuple) else (modules,)) for p in m.parameters())
    return next((p.dtype for p in parameters), default)
