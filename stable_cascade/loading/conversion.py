"""One component between its original single file and a diffusers model folder, both ways.

A single file (Stage C, Stage B, Stage A, EfficientNet encoder, previewer or Stage C ControlNet;
original or diffusers keys) becomes a model folder through the model's ``save_pretrained``; a model
folder becomes an original single file through :func:`convert.to_original_state_dict`. Tensors keep
their dtype unless one is asked for; nothing is overwritten unless asked. A ControlNet's single file
does not say which ResBlock calls it feeds (``proj_blocks``): the released
``[0, 4, 8, 12, 51, 55, 59, 63]`` unless given.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch

from stable_cascade.checkpoint import (
    CheckpointError,
    PretrainedModel,
    parse_dtype,
    read_json_object,
    save_tensors_file,
)
from stable_cascade.checkpoint.atomic import atomic_folder
from stable_cascade.checkpoint.safetensors_io import read_single_file
from stable_cascade.convert import (
    Kind,
    identify,
    split_bundle,
    to_original_state_dict,
    unet_config_from_single_file,
    unet_state_dict_from_single_file,
    vq_config_from_single_file,
    vq_state_dict_from_single_file,
)
from stable_cascade.convert.controlnet import controlnet_config_from_state_dict
from stable_cascade.convert.detect import wrong_kind_message
from stable_cascade.convert.infer import ORIGINAL_STAGE_A_SCALE
from stable_cascade.loading.inspection import read_header, weight_files
from stable_cascade.loading.single_file import effnet_config, previewer_config
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs.controlnet import RELEASED_PROJ_BLOCKS

logger = logging.getLogger(__name__)

#: Model classes by the ``_class_name`` of their ``config.json``, and the kind they export as.
_FOLDER_CLASSES: dict[str, type[PretrainedModel]] = {
    cls.config_class.diffusers_class_name: cls
    for cls in (StableCascadeUNet, PaellaVQModel, EfficientNetEncoder, Previewer, ControlNet)
}
_NAMES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclasses.dataclass(frozen=True)
class Conversion:
    """What :func:`convert_checkpoint` wrote."""

    kind: Kind
    dtype: torch.dtype
    parameters: int
    destination: Path


def convert_checkpoint(
    source: str | Path,
    destination: str | Path,
    *,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    proj_blocks: Sequence[int] | None = None,
) -> Conversion:
    """A single file → a diffusers model folder, or a model folder → an original single file
    (``proj_blocks``: a ControlNet file's ResBlock targets)."""
    source, destination = Path(source), Path(destination)
    target = parse_dtype(dtype)
    if destination.exists() and not overwrite:
        raise FileExistsError(f"{destination} already exists; choose another destination or overwrite it")
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        if destination.suffix == ".safetensors":
            raise ValueError(
                f"{source} is a single file, so the destination is a model folder; {destination} names a file"
            )
        model, kind = model_from_single_file(source, target, proj_blocks)
        with atomic_folder(destination, replace=overwrite) as folder:  # a failure leaves no part
            model.save_pretrained(folder)
    elif (source / "config.json").is_file():
        if destination.suffix != ".safetensors":
            raise ValueError(
                f"{source} is a model folder, so the destination is a .safetensors file; got {destination}"
            )
        if proj_blocks is not None:
            raise ValueError("proj_blocks is for ControlNet single files; a model folder's config has them")
        model, kind = model_from_folder(source, target)
        destination.parent.mkdir(parents=True, exist_ok=True)
        tensors = _original_state_dict(model, kind)
        save_tensors_file({k: v.contiguous() for k, v in tensors.items()}, destination, {"format": "pt"})
    else:
        raise ValueError(
            f"{source} is a folder without config.json; convert takes a single checkpoint file or one "
            "model's diffusers folder (e.g. the prior/ subfolder of a pipeline), not a pipeline folder"
        )
    parameters = sum(p.numel() for p in model.parameters())
    return Conversion(kind, model.dtype, parameters, destination)


def model_from_single_file(
    path: Path, dtype: torch.dtype | None, proj_blocks: Sequence[int] | None = None
) -> tuple[PretrainedModel, Kind]:
    """The model in a single file, in ``dtype`` (default: the file's own floating dtype)."""
    tensors = read_single_file(path)
    kind = identify(tensors).kind
    source = str(path)
    dtype = dtype or _dominant_dtype(tensors.values())
    if proj_blocks is not None and kind is not Kind.CONTROLNET:
        raise ValueError(f"proj_blocks is for ControlNet files; {path} is a {kind.value} file")
    if kind is Kind.COMFY_BUNDLE:
        parts = ", ".join(split_bundle(tensors))
        raise ValueError(
            f"{path} is a ComfyUI bundle (parts: {parts}); convert takes one component's file. Load the "
            "bundle with the pipelines' from_single_file and save_pretrained the pipeline instead"
        )
    model: PretrainedModel
    if kind in (Kind.STAGE_B, Kind.STAGE_C):
        config = unet_config_from_single_file(tensors, source)
        weights = unet_state_dict_from_single_file(tensors)
        model = StableCascadeUNet.from_state_dict(config, weights, source, dtype, copy=False)
    elif kind is Kind.STAGE_A:
        vq_config = vq_config_from_single_file(tensors, source)
        weights = vq_state_dict_from_single_file(tensors)
        model = PaellaVQModel.from_state_dict(vq_config, weights, source, dtype, copy=False)
    elif kind is Kind.EFFNET:
        model = EfficientNetEncoder.from_state_dict(
            effnet_config(tensors, source), tensors, source, dtype, False
        )
    elif kind is Kind.PREVIEWER:
        model = Previewer.from_state_dict(previewer_config(tensors, source), tensors, source, dtype, False)
    elif kind is Kind.CONTROLNET:
        cnet_config = controlnet_config_from_state_dict(tensors, source, proj_blocks)
        model = ControlNet.from_state_dict(cnet_config, tensors, source, dtype, False)
    else:
        expected = "a Stage C, Stage B, Stage A, EfficientNet encoder, previewer or ControlNet"
        raise CheckpointError(wrong_kind_message(source, kind, expected, tensors))
    return model, kind


def model_from_folder(folder: Path, dtype: torch.dtype | None) -> tuple[PretrainedModel, Kind]:
    """The model of a diffusers model folder, in ``dtype`` (default: its weights' dtype)."""
    data = read_json_object(folder / "config.json")
    class_name = str(data.get("_class_name"))
    if class_name not in _FOLDER_CLASSES:
        raise ValueError(
            f"{folder}/config.json describes a {class_name}; convert exports "
            f"{', '.join(_FOLDER_CLASSES)} folders"
        )
    groups = weight_files(folder)
    if not groups:
        raise FileNotFoundError(f"{folder} holds no .safetensors weights")
    if None not in groups:
        raise ValueError(
            f"{folder} only holds weight variants ({', '.join(map(str, groups))}); convert reads the "
            "default (variant-free) weights"
        )
    header = read_header(*groups[None])
    file_dtype = _NAMES.get(header.dtype.split(" + ")[0], torch.float32)
    cls = _FOLDER_CLASSES[class_name]
    model = cls.from_pretrained(folder, torch_dtype=dtype or file_dtype)
    if isinstance(model, StableCascadeUNet):
        kind = Kind.STAGE_B if model.config.is_stage_b else Kind.STAGE_C
    else:
        kinds = {PaellaVQModel: Kind.STAGE_A, EfficientNetEncoder: Kind.EFFNET, ControlNet: Kind.CONTROLNET}
        kind = kinds.get(type(model), Kind.PREVIEWER)
    return model, kind


def _original_state_dict(model: PretrainedModel, kind: Kind) -> Mapping[str, torch.Tensor]:
    state = model.state_dict()
    if isinstance(model, ControlNet) and model.config.proj_blocks != RELEASED_PROJ_BLOCKS:
        logger.warning(
            "a ControlNet single file does not record its targets: load it with proj_blocks=%s",
            list(model.config.proj_blocks),
        )
    if kind in (Kind.EFFNET, Kind.PREVIEWER, Kind.CONTROLNET):
        return state  # our keys are the original ones
    if isinstance(model, PaellaVQModel) and model.config.scale_factor != ORIGINAL_STAGE_A_SCALE:
        logger.warning(
            "the single-file Stage A format has no latent scale; loaders assume %s, this model has %s",
            ORIGINAL_STAGE_A_SCALE,
            model.config.scale_factor,
        )
    return to_original_state_dict(state, kind)


def _dominant_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """The floating dtype holding most elements (float32 when there is none)."""
    counts: dict[torch.dtype, int] = {}
    for tensor in tensors:
        if tensor.is_floating_point():
            counts[tensor.dtype] = counts.get(tensor.dtype, 0) + tensor.numel()
    return max(counts, key=lambda d: counts[d]) if counts else torch.float32
