"""The single-file loading hooks of the UNet and Stage A, and the export back to original files.

Accepted inputs: an original Stability single file, the same tensors in the diffusers layout, or a
ComfyUI bundle (its matching part is used). Any other component is refused with an error naming
what the file is and which class loads it.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert.detect import Kind, identify, split_bundle, wrong_kind_message
from stable_cascade.convert.infer import ORIGINAL_STAGE_A_SCALE, infer_unet_config, infer_vq_config
from stable_cascade.convert.keys import (
    STAGE_B_MARKER,
    unet_diffusers_to_original,
    unet_original_to_diffusers,
    vq_diffusers_to_original,
    vq_original_to_diffusers,
)
from stable_cascade.specs import UNetConfig, VQConfig

_UNET = (Kind.STAGE_C, Kind.STAGE_B)


def _component(
    state_dict: Mapping[str, torch.Tensor], part: str, kinds: tuple[Kind, ...], expected: str, source: str
) -> Mapping[str, torch.Tensor]:
    """The tensors of the wanted component: the file itself or its bundle part, after a kind check."""
    found = identify(state_dict).kind
    if found is Kind.COMFY_BUNDLE:
        parts = split_bundle(state_dict)
        if part not in parts:
            raise CheckpointError(
                f"{source} is a ComfyUI bundle without {expected}; it holds: {', '.join(parts)}"
            )
        state_dict = parts[part]
        found = identify(state_dict).kind
    if found not in kinds:
        raise CheckpointError(wrong_kind_message(source, found, expected, state_dict))
    return state_dict


def _strip_bundle(state_dict: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    if identify(state_dict).kind is not Kind.COMFY_BUNDLE:
        return state_dict
    parts = split_bundle(state_dict)
    if part not in parts:
        raise CheckpointError(f"the ComfyUI bundle has no {part} part; it holds: {', '.join(parts)}")
    return parts[part]


def unet_config_from_single_file(state_dict: Mapping[str, torch.Tensor], source: str) -> UNetConfig:
    """The inferred config of a Stage B / Stage C file (or bundle), refusing other components."""
    unet = _component(state_dict, "unet", _UNET, "a Stage B / Stage C UNet", source)
    try:
        return infer_unet_config(unet)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from error


def unet_state_dict_from_single_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's UNet tensors under diffusers keys (a diffusers-layout file passes unchanged)."""
    return unet_original_to_diffusers(_strip_bundle(state_dict, "unet"))


def vq_config_from_single_file(state_dict: Mapping[str, torch.Tensor], source: str) -> VQConfig:
    """The inferred config of a Stage A file (or bundle), with the original latent scale 0.43."""
    vq = _component(state_dict, "stage_a", (Kind.STAGE_A,), "a Stage A (VQGAN)", source)
    try:
        return infer_vq_config(vq, scale_factor=ORIGINAL_STAGE_A_SCALE)
    except CheckpointError as error:
        raise CheckpointError(f"{source}: {error}") from error


def vq_state_dict_from_single_file(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's Stage A tensors under diffusers keys."""
    return vq_original_to_diffusers(_strip_bundle(state_dict, "stage_a"))


def to_original_state_dict(
    model_state_dict: Mapping[str, torch.Tensor], kind: Kind
) -> dict[str, torch.Tensor]:
    """A diffusers-layout state dict of Stage C, Stage B or Stage A under the original single-file keys."""
    if kind is Kind.STAGE_A:
        return vq_diffusers_to_original(model_state_dict)
    if kind not in _UNET:
        raise ValueError(f"to_original_state_dict converts Stage A, B or C state dicts, not {kind.value}")
    if (kind is Kind.STAGE_B) != (STAGE_B_MARKER in model_state_dict):
        has = "has" if STAGE_B_MARKER in model_state_dict else "lacks"
        raise ValueError(
            f"the state dict {has} {STAGE_B_MARKER}, so it is not {kind.article} {kind.value} one; "
            "pass the kind of the model it comes from"
        )
    return unet_diffusers_to_original(model_state_dict)
