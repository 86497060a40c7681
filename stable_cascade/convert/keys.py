"""Key maps between the original Stable Cascade single files and the diffusers layout.

Every map is a pure function ``dict[str, Tensor] -> dict[str, Tensor]``: the input is never
modified, keys keep the input's order, and split tensors are copies (so a loaded model owns no views of
the file's packed projections and can be saved again with safetensors).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from stable_cascade.checkpoint import CheckpointError

# Original nn.MultiheadAttention names → diffusers' Attention names.
_IN_PROJ = "attention.attn.in_proj_"  # + "weight" / "bias": q, k, v stacked on dim 0
_OUT_PROJ = "attention.attn.out_proj."
_QKV = ("to_q", "to_k", "to_v")
_TO_OUT = "attention.to_out.0."
# ComfyUI keeps the projections split but under ``attn``: ``…attention.attn.to_q.weight``.
_COMFY_QKV = re.compile(r"\.attention\.attn\.(to_[qkv])\.")
# Stage B's pooled-text mapper: original ``clip_mapper``, diffusers ``clip_txt_pooled_mapper``.
_CLIP_ORIGINAL = "clip_mapper."
_CLIP_DIFFUSERS = "clip_txt_pooled_mapper."
STAGE_B_MARKER = "effnet_mapper.0.weight"
# Stage A's codebook.
_CODEBOOK_ORIGINAL = "vquantizer.codebook.weight"
_CODEBOOK_DIFFUSERS = "vquantizer.embedding.weight"


def unet_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Stage B / C keys → diffusers ``StableCascadeUNet`` keys.

    ``…attention.attn.in_proj_{weight,bias}`` is split in equal thirds into ``…attention.to_{q,k,v}``,
    ``…attention.attn.out_proj.*`` becomes ``…attention.to_out.0.*`` and Stage B's ``clip_mapper.*``
    becomes ``clip_txt_pooled_mapper.*``, as diffusers' single-file converter does. ComfyUI's split
    ``…attention.attn.to_{q,k,v}`` lose the ``attn``. Keys already in the diffusers layout pass
    through unchanged, so the map is idempotent.
    """
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        prefix, found, suffix = key.rpartition(_IN_PROJ)
        if found and suffix in ("weight", "bias"):
            if tensor.shape[0] % 3:
                raise CheckpointError(
                    f"{key} has shape {tuple(tensor.shape)}; a packed q/k/v projection needs a first "
                    "dimension divisible by 3"
                )
            for name, part in zip(_QKV, tensor.chunk(3, dim=0), strict=True):
                converted[f"{prefix}attention.{name}.{suffix}"] = part.clone()
        elif _OUT_PROJ in key:
            converted[key.replace(_OUT_PROJ, _TO_OUT)] = tensor
        elif _COMFY_QKV.search(key):
            converted[_COMFY_QKV.sub(r".attention.\1.", key)] = tensor
        elif key.startswith(_CLIP_ORIGINAL):
            converted[_CLIP_DIFFUSERS + key.removeprefix(_CLIP_ORIGINAL)] = tensor
        else:
            converted[key] = tensor
    return converted


def unet_diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``StableCascadeUNet`` keys → original keys (inverse of :func:`unet_original_to_diffusers`).

    ``to_q/to_k/to_v`` are concatenated (in that order) into ``attn.in_proj_*``; the pooled-text
    mapper is renamed back to ``clip_mapper`` only for Stage B (when ``effnet_mapper`` is present).
    """
    stage_b = STAGE_B_MARKER in state_dict
    converted: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        head, found, tail = key.rpartition(".attention.")
        name, _, suffix = tail.partition(".")
        if found and name in _QKV:
            if name != "to_q":
                continue  # packed together with to_q, below
            parts = [f"{head}.attention.{n}.{suffix}" for n in _QKV]
            missing = [p for p in parts if p not in state_dict]
            if missing:
                raise CheckpointError(f"cannot pack {key}: {', '.join(missing)} missing")
            converted[f"{head}.{_IN_PROJ}{suffix}"] = torch.cat([state_dict[p] for p in parts], dim=0)
        elif _TO_OUT in key:
            converted[key.replace(_TO_OUT, _OUT_PROJ)] = tensor
        elif stage_b and key.startswith(_CLIP_DIFFUSERS):
            converted[_CLIP_ORIGINAL + key.removeprefix(_CLIP_DIFFUSERS)] = tensor
        else:
            converted[key] = tensor
    orphans = [k for k in state_dict if _is_orphan_projection(k, state_dict)]
    if orphans:
        raise CheckpointError(f"cannot pack {orphans[0]}: its to_q tensor is missing")
    return converted


def _is_orphan_projection(key: str, state_dict: Mapping[str, torch.Tensor]) -> bool:
    """A ``to_k``/``to_v`` tensor without the ``to_q`` it is packed with."""
    head, found, tail = key.rpartition(".attention.")
    name, _, suffix = tail.partition(".")
    return bool(found) and name in _QKV[1:] and f"{head}.attention.to_q.{suffix}" not in state_dict


def vq_original_to_diffusers(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Original Stage A keys → diffusers ``PaellaVQModel`` keys: only the codebook is renamed."""
    return {(_CODEBOOK_DIFFUSERS if k == _CODEBOOK_ORIGINAL else k): v for k, v in state_dict.items()}


def vq_diffusers_to_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Diffusers ``PaellaVQModel`` keys → original Stage A keys (the inverse map)."""
    return {(_CODEBOOK_ORIGINAL if k == _CODEBOOK_DIFFUSERS else k): v for k, v in state_dict.items()}


def is_original_unet_layout(keys: Mapping[str, object]) -> bool:
    """Whether a UNet state dict uses original (or ComfyUI) names: ``attention.attn.*`` or ``clip_mapper``."""
    return any(".attention.attn." in k or k.startswith(_CLIP_ORIGINAL) for k in keys)
