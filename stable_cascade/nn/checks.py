"""The checks of what a caller passes the UNet: the sample's shape, the dtypes, and which conditioning a
stage takes."""

from __future__ import annotations

import torch

from stable_cascade.specs import UNetConfig


def stage_name(cfg: UNetConfig) -> str:
    return "Stage B (decoder)" if cfg.is_stage_b else "Stage C (prior)"


def check_dtypes(cfg: UNetConfig, model_dtype: torch.dtype, tensors: dict[str, torch.Tensor | None]) -> None:
    """Inputs are floating point and, outside autocast, in the model's dtype (a float64 tensor into a
    float32 model would otherwise fail deep inside with a matmul error)."""
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            what = tensor.dtype if isinstance(tensor, torch.Tensor) else type(tensor).__name__
            raise TypeError(f"{name} must be a floating-point tensor, got {what}")
        if tensor.dtype != model_dtype and not torch.is_autocast_enabled(tensor.device.type):
            raise TypeError(
                f"{name} is {tensor.dtype} but {stage_name(cfg)} runs in {model_dtype}; cast the inputs "
                f"with .to({model_dtype}) or the model with .to({tensor.dtype})"
            )


def check_sample(cfg: UNetConfig, sample: torch.Tensor) -> None:
    """The UNet's sample: (B, in_channels, H, W) with H, W fitting the patch size and the levels."""
    if sample.ndim != 4 or sample.shape[1] != cfg.in_channels or sample.shape[0] < 1:
        shape = tuple(sample.shape)
        raise ValueError(
            f"{stage_name(cfg)} expects sample of shape (B, {cfg.in_channels}, H, W) with B >= 1; got {shape}"
        )
    # Every strided (or enabled switch_level) transition halves the size, which must stay >= 1.
    halvings = len(cfg.block_out_channels) - 1 if cfg.switch_level is None else sum(cfg.switch_level)
    min_size = cfg.patch_size * 2**halvings
    h, w = sample.shape[-2:]
    if h % cfg.patch_size or w % cfg.patch_size or h < min_size or w < min_size:
        raise ValueError(
            f"{stage_name(cfg)} needs latent height and width that are multiples of {cfg.patch_size} and at "
            f"least {min_size}; got {h}x{w}"
        )


def check_conditioning(
    cfg: UNetConfig,
    pooled: torch.Tensor,
    text: torch.Tensor | None,
    image: torch.Tensor | None,
    effnet: torch.Tensor | None,
) -> None:
    """The UNet's conditioning, one row per sample; each error says what was expected."""
    stage = stage_name(cfg)
    if (
        pooled.ndim not in (2, 3)
        or pooled.shape[-1] != cfg.clip_text_pooled_in_channels
        or pooled.numel() == 0
    ):
        raise ValueError(
            f"clip_text_pooled must be (B, 1, {cfg.clip_text_pooled_in_channels}) with B >= 1; got "
            f"{tuple(pooled.shape)}"
        )
    for name, tensor, width, shape in (
        ("clip_text", text, cfg.clip_text_in_channels, "(B, L, {})"),
        ("clip_img", image, cfg.clip_image_in_channels, "(B, N, {}) or (B, {})"),
    ):
        if tensor is None or width is None:
            continue
        if tensor.ndim not in ((3,) if name == "clip_text" else (2, 3)) or tensor.shape[-1] != width:
            raise ValueError(f"{name} must be {shape.format(width, width)}; got {tuple(tensor.shape)}")
        if name == "clip_img" and tensor.numel() == 0:
            raise ValueError(
                f"clip_img has no image embeddings (shape {tuple(tensor.shape)}); pass None instead"
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
    if effnet is not None and (effnet.ndim != 4 or effnet.shape[1] != cfg.effnet_in_channels):
        raise ValueError(f"effnet must be (B, {cfg.effnet_in_channels}, h, w); got {tuple(effnet.shape)}")
    batch = pooled.shape[0]
    for name, tensor in (
        ("clip_text", text),
        ("clip_img", image),
        ("effnet", effnet),
    ):
        if tensor is not None and tensor.shape[0] != batch:
            raise ValueError(f"{name} has batch size {tensor.shape[0]} but clip_text_pooled has {batch}")
