"""The Stable Cascade UNet: one class for Stage C (the prior) and Stage B (the decoder).

Matches diffusers' ``StableCascadeUNet`` in constructor arguments, state-dict keys and numerics,
and fixes its per-sample ``sca``/``crp`` handling (diffusers fails for batches larger than one).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, cast

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from stable_cascade.checkpoint import PretrainedModel
from stable_cascade.convert import (
    Kind,
    to_original_state_dict,
    unet_config_from_single_file,
    unet_state_dict_from_single_file,
)
from stable_cascade.nn.layers import (
    AttnBlock,
    BlockConditioning,
    LayerNorm2d,
    ResBlock,
    TimestepBlock,
    UpDownBlock2d,
    resize_like,
    timestep_embedding,
)
from stable_cascade.specs import BlockType, UNetConfig


@dataclasses.dataclass
class StableCascadeUNetOutput:
    sample: torch.Tensor  # (B, out_channels, H, W)


TensorLike = torch.Tensor | float


class StableCascadeUNet(PretrainedModel):
    """ε-predicting UNet of Stage B / Stage C; ``StableCascadeUNet(**diffusers_config)`` or from a config."""

    config_class = UNetConfig
    config: UNetConfig

    def __init__(self, config: UNetConfig | Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = cfg = self.resolve_config(config, kwargs)
        c0 = cfg.block_out_channels[0]
        if cfg.effnet_in_channels is not None:
            self.effnet_mapper = _conditioning_mapper(cfg.effnet_in_channels, c0)
        if cfg.pixel_mapper_in_channels is not None:
            self.pixels_mapper = _conditioning_mapper(cfg.pixel_mapper_in_channels, c0)
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
        clip_text_pooled: torch.Tensor,
        clip_text: torch.Tensor | None = None,
        clip_img: torch.Tensor | None = None,
        effnet: torch.Tensor | None = None,
        pixels: torch.Tensor | None = None,
        sca: TensorLike | None = None,
        crp: TensorLike | None = None,
        return_dict: bool = True,
    ) -> StableCascadeUNetOutput | tuple[torch.Tensor]:
        """Predict the noise in ``sample`` (B, in_channels, H, W) at ``timestep_ratio`` (scalar or (B,)).

        ``sca``/``crp`` may be scalars or one value per sample; missing ones are embedded as 0, as in
        the original. Stage C without ``clip_img`` uses one zero image embedding, as the pipelines do.
        """
        _check_inputs(self, sample, clip_text_pooled, clip_text, clip_img, effnet)
        batch = sample.shape[0]
        r = _per_sample(timestep_ratio, batch, sample)
        extra = {"sca": sca, "crp": crp}
        embeddings = [timestep_embedding(r, self.config.timestep_ratio_embedding_dim)]
        for name in self.config.timestep_conditioning_type:
            value = extra[name]
            t_cond = torch.zeros_like(r) if value is None else _per_sample(value, batch, sample)
            embeddings.append(timestep_embedding(t_cond, self.config.timestep_ratio_embedding_dim))
        cond = BlockConditioning(
            torch.cat(embeddings, dim=1), self.clip_tokens(clip_text_pooled, clip_text, clip_img)
        )

        x = self.embedding(sample)  # (B, c0, H/p, W/p)
        if effnet is not None:
            x = x + self.effnet_mapper(resize_like(effnet, x.shape[-2:]))
        if (pixel_channels := self.config.pixel_mapper_in_channels) is not None:
            if pixels is None:
                pixels = sample.new_zeros(batch, pixel_channels, 8, 8)
            x = x + resize_like(self.pixels_mapper(pixels), x.shape[-2:])
        skips = self._down(x, cond)
        out = self.clf(self._up(skips, cond))
        return StableCascadeUNetOutput(sample=out) if return_dict else (out,)

    def clip_tokens(
        self, pooled: torch.Tensor, text: torch.Tensor | None = None, image: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Normalised CLIP tokens: Stage C ``[text | 4 pooled | 4 per image]``, Stage B ``[4 pooled]``."""
        if pooled.ndim == 2:
            pooled = pooled[:, None]  # (B, 1, C)
        b, seq = pooled.shape[0], self.config.clip_seq
        tokens = self.clip_txt_pooled_mapper(pooled).view(b, pooled.shape[1] * seq, -1)
        if text is not None:
            if image is None:
                image = pooled.new_zeros(b, 1, self.config.clip_image_in_channels or 0)
            elif image.ndim == 2:
                image = image[:, None]  # (B, 1, C)
            image_tokens = self.clip_img_mapper(image).view(b, image.shape[1] * seq, -1)
            tokens = torch.cat([self.clip_txt_mapper(text), tokens, image_tokens], dim=1)
        return self.clip_norm(tokens)  # (B, L, c_cond)

    def _run_level(
        self, level: int, direction: str, x: torch.Tensor, cond: BlockConditioning, skip: torch.Tensor | None
    ) -> torch.Tensor:
        down = direction == "down"
        blocks = cast(nn.ModuleList, (self.down_blocks if down else self.up_blocks)[level])
        mappers = cast(nn.ModuleList, (self.down_repeat_mappers if down else self.up_repeat_mappers)[level])
        for repeat in range(len(mappers) + 1):
            for k, block in enumerate(blocks):
                if k == 0 and skip is not None:
                    x = resize_like(x, skip.shape[-2:])  # odd sizes: match the skip first
                    x = self._call(block, x, cond, skip)
                else:
                    x = self._call(block, x, cond)
            if repeat < len(mappers):
                x = mappers[repeat](x)
        return x

    def _call(self, block: nn.Module, x: torch.Tensor, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, *args, use_reentrant=False)  # type: ignore[no-any-return]
        return block(x, *args)  # type: ignore[no-any-return]

    def _down(self, x: torch.Tensor, cond: BlockConditioning) -> list[torch.Tensor]:
        """Run the down path; returns each level's output, deepest first."""
        outputs: list[torch.Tensor] = []
        for level, downscaler in enumerate(self.down_downscalers):
            x = self._run_level(level, "down", downscaler(x), cond, None)
            outputs.insert(0, x)
        return outputs

    def _up(self, skips: list[torch.Tensor], cond: BlockConditioning) -> torch.Tensor:
        x = skips[0]
        for level, upscaler in enumerate(self.up_upscalers):
            x = upscaler(self._run_level(level, "up", x, cond, skips[level] if level > 0 else None))
        return x

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


def _conditioning_mapper(c_in: int, c: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c * 4, kernel_size=1), nn.GELU(), nn.Conv2d(c * 4, c, kernel_size=1), LayerNorm2d()
    )


def _per_sample(value: TensorLike, batch: int, like: torch.Tensor) -> torch.Tensor:
    """A scalar or (B,) value as a float (B,) tensor on ``like``'s device."""
    tensor = torch.as_tensor(value, device=like.device)
    if not tensor.is_floating_point():
        tensor = tensor.float()
    if tensor.ndim == 0:
        return tensor.expand(batch)
    if tensor.shape != (batch,):
        raise ValueError(
            f"expected a scalar or one value per sample, shape ({batch},); got shape {tuple(tensor.shape)}"
        )
    return tensor


def _check_inputs(
    unet: StableCascadeUNet,
    sample: torch.Tensor,
    pooled: torch.Tensor,
    text: torch.Tensor | None,
    image: torch.Tensor | None,
    effnet: torch.Tensor | None,
) -> None:
    """User-facing shape checks, each saying what was expected and how to fix it."""
    cfg = unet.config
    stage = "Stage B (decoder)" if cfg.is_stage_b else "Stage C (prior)"
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
        raise ValueError(
            f"{stage} expects sample of shape (B, {cfg.in_channels}, H, W); got {tuple(sample.shape)}"
        )
    min_size = cfg.patch_size * 2 ** (len(cfg.block_out_channels) - 1) if cfg.switch_level is None else 1
    h, w = sample.shape[-2:]
    if h % cfg.patch_size or w % cfg.patch_size or h < min_size or w < min_size:
        raise ValueError(
            f"{stage} needs latent height and width that are multiples of {cfg.patch_size} and at least "
            f"{min_size}; got {h}x{w}"
        )
    if pooled.ndim not in (2, 3) or pooled.shape[-1] != cfg.clip_text_pooled_in_channels:
        raise ValueError(
            f"clip_text_pooled must be (B, 1, {cfg.clip_text_pooled_in_channels}); got {tuple(pooled.shape)}"
        )
    if cfg.clip_text_in_channels is None:
        if text is not None or image is not None:
            raise ValueError(f"{stage} is conditioned on pooled text only; do not pass clip_text or clip_img")
    elif text is None:
        raise ValueError(
            f"{stage} requires clip_text, the CLIP text hidden states of shape "
            f"(B, 77, {cfg.clip_text_in_channels})"
        )
    if cfg.effnet_in_channels is not None and effnet is None:
        raise ValueError(
            f"{stage} requires effnet, the Stage C latent (B, {cfg.effnet_in_channels}, h, w); "
            "pass zeros for the unconditional branch"
        )
    if cfg.effnet_in_channels is None and effnet is not None:
        raise ValueError(f"{stage} takes no effnet input; only Stage B is conditioned on the Stage C latent")
    if effnet is not None and (effnet.ndim != 4 or effnet.shape[1] != cfg.effnet_in_channels):
        raise ValueError(f"effnet must be (B, {cfg.effnet_in_channels}, h, w); got {tuple(effnet.shape)}")
    for name, tensor in (
        ("clip_text_pooled", pooled),
        ("clip_text", text),
        ("clip_img", image),
        ("effnet", effnet),
    ):
        if tensor is not None and tensor.shape[0] != sample.shape[0]:
            raise ValueError(f"{name} has batch size {tensor.shape[0]} but sample has {sample.shape[0]}")
