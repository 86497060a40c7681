"""CLIP text and vision towers (transformers' ``…WithProjection`` classes) built from bare state dicts.

ComfyUI bundles carry the text encoder and image encoder as tensors without a config, so the config
is read off the shapes and key indices: vocabulary, width, MLP width, depth, positions, projection
(and patch and image size for vision). Two values the weights cannot tell follow documented rules,
each overridable:

* heads: ``hidden / 64`` (every released CLIP tower has 64-wide heads: ViT-L/14 1024 → 16, bigG
  1280 → 20); other widths need ``num_attention_heads``.
* activation: OpenAI CLIP towers use ``quick_gelu`` (text ≤ 768 wide, vision ≤ 1024), OpenCLIP's wider
  ViT-H / bigG towers ``gelu`` (text ≥ 1024 wide, vision > 1024) — so the Stable Cascade text
  encoder (bigG text, 1280) gets ``gelu`` and its image encoder (ViT-L/14 vision, 1024) ``quick_gelu``.

Token ids follow CLIP's vocabulary, whose last two entries are ``<|startoftext|>`` and
``<|endoftext|>``: bos = vocab − 2, eos = pad = vocab − 1 (transformers' defaults for 49408). The
models are built on the ``meta`` device and take the tensors after a strict key and shape check.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TypeVar

import torch
from transformers import (
    CLIPTextConfig,
    CLIPTextModelWithProjection,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from stable_cascade.checkpoint import CheckpointError, check_state_dict

HEAD_WIDTH = 64
#: Text towers at least this wide are OpenCLIP's (ViT-H 1024, bigG 1280) and use exact GELU.
TEXT_GELU_FROM = 1024
#: Vision towers wider than this are OpenCLIP's (ViT-H 1280, bigG 1664) and use exact GELU.
VISION_QUICK_GELU_UP_TO = 1024
#: Buffers older transformers saved and ComfyUI files may still hold; rebuilt, never loaded.
_LEGACY_BUFFERS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")
# ComfyUI's own naming of the bigG text encoder (``clip_g.transformer.text_model.*``, and the
# projection as a matrix used as ``x @ P``, i.e. the transposed Linear weight).
_COMFY_CLIP_G = "clip_g.transformer."
_COMFY_CLIP_G_PROJECTION = "clip_g.text_projection"

M = TypeVar("M", CLIPTextModelWithProjection, CLIPVisionModelWithProjection)


def normalize_clip_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers key layout of a CLIP state dict: ComfyUI's ``clip_g.transformer.*`` prefix and
    transposed ``clip_g.text_projection`` are mapped (as ComfyUI's ``process_clip_state_dict``), its
    ``clip_g.logit_scale`` and legacy ``position_ids`` buffers dropped; other keys pass unchanged."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == _COMFY_CLIP_G_PROJECTION:
            out["text_projection.weight"] = value.t()
            continue
        name = key.removeprefix(_COMFY_CLIP_G)
        if name not in (*_LEGACY_BUFFERS, "clip_g.logit_scale"):
            out[name] = value
    return out


def clip_text_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    hidden_act: str | None = None,
    source: str = "state dict",
) -> CLIPTextConfig:
    """The ``CLIPTextConfig`` of a text tower in the transformers layout (``text_model.*``)."""
    vocab, hidden = _shape(state_dict, "text_model.embeddings.token_embedding.weight", source)
    positions, _ = _shape(state_dict, "text_model.embeddings.position_embedding.weight", source)
    projection, _ = _shape(state_dict, "text_projection.weight", source)
    return CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=_shape(state_dict, "text_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=_depth(state_dict, "text_model.encoder.layers.", source),
        num_attention_heads=_heads(hidden, num_attention_heads, source),
        max_position_embeddings=positions,
        projection_dim=projection,
        hidden_act=hidden_act or ("gelu" if hidden >= TEXT_GELU_FROM else "quick_gelu"),
        bos_token_id=vocab - 2,
        eos_token_id=vocab - 1,
        pad_token_id=vocab - 1,
    )


def clip_vision_config(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    hidden_act: str | None = None,
    source: str = "state dict",
) -> CLIPVisionConfig:
    """The ``CLIPVisionConfig`` of a vision tower in the transformers layout (``vision_model.*``)."""
    hidden, channels, patch, _ = _shape(state_dict, "vision_model.embeddings.patch_embedding.weight", source)
    positions, _ = _shape(state_dict, "vision_model.embeddings.position_embedding.weight", source)
    side = math.isqrt(positions - 1)  # positions = class token + side² patches
    if side * side != positions - 1:
        raise CheckpointError(
            f"{source}: {positions} position embeddings are not 1 + a square number of patches"
        )
    return CLIPVisionConfig(
        hidden_size=hidden,
        intermediate_size=_shape(state_dict, "vision_model.encoder.layers.0.mlp.fc1.weight", source)[0],
        num_hidden_layers=_depth(state_dict, "vision_model.encoder.layers.", source),
        num_attention_heads=_heads(hidden, num_attention_heads, source),
        num_channels=channels,
        image_size=side * patch,
        patch_size=patch,
        projection_dim=_shape(state_dict, "visual_projection.weight", source)[0],
        hidden_act=hidden_act or ("quick_gelu" if hidden <= VISION_QUICK_GELU_UP_TO else "gelu"),
    )


def clip_text_model(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    hidden_act: str | None = None,
    dtype: torch.dtype | None = None,
    source: str = "state dict",
) -> CLIPTextModelWithProjection:
    """A ``CLIPTextModelWithProjection`` holding ``state_dict`` (config from :func:`clip_text_config`)."""
    state_dict = normalize_clip_keys(state_dict)
    config = clip_text_config(
        state_dict, num_attention_heads=num_attention_heads, hidden_act=hidden_act, source=source
    )
    return _load(CLIPTextModelWithProjection, config, state_dict, dtype, source)


def clip_vision_model(
    state_dict: Mapping[str, torch.Tensor],
    *,
    num_attention_heads: int | None = None,
    hidden_act: str | None = None,
    dtype: torch.dtype | None = None,
    source: str = "state dict",
) -> CLIPVisionModelWithProjection:
    """A ``CLIPVisionModelWithProjection`` holding ``state_dict`` (config from :func:`clip_vision_config`)."""
    state_dict = normalize_clip_keys(state_dict)
    config = clip_vision_config(
        state_dict, num_attention_heads=num_attention_heads, hidden_act=hidden_act, source=source
    )
    return _load(CLIPVisionModelWithProjection, config, state_dict, dtype, source)


def _load(
    cls: type[M],
    config: CLIPTextConfig | CLIPVisionConfig,
    state_dict: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None,
    source: str,
) -> M:
    """Build on meta, check every key and shape, adopt the tensors, rebuild ``position_ids``."""
    with torch.device("meta"):
        model: M = cls(config)  # type: ignore[arg-type]
    check_state_dict(model, state_dict, source)
    model.load_state_dict(dict(state_dict), strict=True, assign=True)
    for module in model.modules():
        ids = getattr(module, "position_ids", None)
        if isinstance(ids, torch.Tensor) and ids.is_meta:  # non-persistent: (1, positions)
            fresh = torch.arange(ids.shape[-1]).expand(1, -1)
            module.register_buffer("position_ids", fresh, persistent=False)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "unloaded meta tensor"
    if dtype is not None:
        model.to(dtype=dtype)  # type: ignore[call-arg]  # transformers' wrapped ``to`` confuses mypy
    model.eval()
    return model


def _shape(state_dict: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in state_dict:
        first = ", ".join(list(state_dict)[:5]) or "no tensors"
        raise CheckpointError(
            f"{source} is not a CLIP model in the transformers layout: it lacks {key} (first keys: {first})"
        )
    return tuple(state_dict[key].shape)


def _depth(state_dict: Mapping[str, torch.Tensor], prefix: str, source: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = {int(m.group(1)) for k in state_dict if (m := pattern.match(k))}
    if indices != set(range(len(indices))):
        raise CheckpointError(f"{source}: the layers {prefix}N are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _heads(hidden: int, heads: int | None, source: str) -> int:
    if heads is not None:
        if heads < 1 or hidden % heads:
            raise ValueError(f"num_attention_heads={heads} does not divide the width {hidden} of {source}")
        return heads
    if hidden % HEAD_WIDTH:
        raise CheckpointError(
            f"{source}: the head count of a {hidden}-wide CLIP tower cannot be inferred (it is "
            f"width / {HEAD_WIDTH} for released CLIP models); pass num_attention_heads"
        )
    return hidden // HEAD_WIDTH
