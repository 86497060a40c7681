"""Stage C ControlNets by name or path: where one lives, what control it takes, and loading it.

A job names a ControlNet by its released name (``canny``, ``inpainting``, ``super_resolution``: the
bundle's file, e.g. ``stabilityai/stable-cascade/controlnet/canny.safetensors`` on the Hub, or the
demo's own folder) or by a local original single file or diffusers model folder.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stable_cascade.checkpoint import read_json_object
from stable_cascade.convert.controlnet import controlnet_config_from_state_dict
from stable_cascade.loading.bundles import RELEASED_CONTROLNETS, ModelBundle
from stable_cascade.loading.inspection import PICKLE_SUFFIXES, read_header
from stable_cascade.loading.single_file import resolve_checkpoint
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.specs.controlnet import ControlType


def is_released(controlnet: str) -> bool:
    return controlnet in RELEASED_CONTROLNETS


def controlnet_spec(controlnet: str, bundle: ModelBundle) -> str:
    """The file or folder of ``controlnet``: a released name through ``bundle``, else the path itself."""
    if is_released(controlnet):
        spec = bundle.controlnet(controlnet)
        if spec is None:
            offered = ", ".join(name for name, _ in bundle.controlnets) or "none"
            raise ValueError(
                f"the {bundle.name} model has no {controlnet} ControlNet (it has: {offered}); use a model "
                "that has one (--model full) or pass a ControlNet file"
            )
        return spec
    return local_controlnet(controlnet)


def local_controlnet(controlnet: str) -> str:
    """``controlnet`` if it is a ControlNet file or model folder, else a ``ValueError`` saying why not."""
    path = Path(controlnet)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"ControlNet {controlnet} is a pickle file, which can run arbitrary code; pass .safetensors"
        )
    if not path.exists():
        raise ValueError(
            f"ControlNet {controlnet} is neither a released name ({', '.join(RELEASED_CONTROLNETS)}) nor an "
            "existing file or folder; pass one of those"
        )
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"ControlNet folder {controlnet} has no config.json; pass a ControlNet model folder")
    return str(path)


def controlnet_type(controlnet: str) -> ControlType | None:
    """The control a ControlNet takes: the released name's, or read from a local file's tensor shapes
    or a folder's ``config.json`` (None when the file does not tell)."""
    if is_released(controlnet):
        return controlnet  # type: ignore[return-value]  # the released names are the control types
    path = Path(controlnet)
    if path.is_dir():
        config = read_json_object(path / "config.json")
        if config.get("_class_name") != ControlNet.config_class.diffusers_class_name:
            raise ValueError(
                f"{controlnet}/config.json describes a {config.get('_class_name')}, not a ControlNet"
            )
        value = config.get("control_type")
        return value if isinstance(value, str) else None  # type: ignore[return-value]  # checked by the job
    return controlnet_config_from_state_dict(read_header(path).shapes, str(path)).control_type


def load_controlnet(spec: str, torch_dtype: torch.dtype) -> tuple[ControlNet, Path]:
    """The ControlNet in ``spec`` (a model folder, a local file or a Hub file) and its local path."""
    path = Path(spec)
    if path.is_dir():
        return ControlNet.from_pretrained(path, torch_dtype=torch_dtype), path
    file = resolve_checkpoint(spec)
    return ControlNet.from_single_file(file, torch_dtype=torch_dtype), file
