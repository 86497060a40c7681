"""The image side a model was trained at, when it can be told without loading the model.

The released models make 1024² images, the demo cascade (``--model demo``) 128² ones. A model
derived from the demo (retrained, fine-tuned, given a LoRA, saved to another folder or exported to
one file) keeps the demo's architecture, which no released model has, so a model whose structure
(every config field its weights determine: all but heads and dropout) is the demo's is taken to be
native at 128. The config is read from ``config.json`` (a model folder, a pipeline folder's
component, a ``.json`` config) or inferred from a safetensors header (an original single file, a
diffusers file or a ComfyUI bundle); nothing is downloaded, so Hub models, unreadable files and
other architectures give None, and callers then use the released models' 1024.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from stable_cascade.checkpoint import CheckpointError, read_json_object
from stable_cascade.convert import Kind, identify, split_bundle
from stable_cascade.convert.infer import released_unet_config
from stable_cascade.loading.bundles import BUNDLES
from stable_cascade.loading.components import MODEL_INDEX
from stable_cascade.loading.inspection import read_header
from stable_cascade.loading.sources import ModelSources
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS, UNetConfig, VQConfig

Component = Literal["prior", "decoder", "vqgan"]

#: The demo's output side, and its models' configs by pipeline component name.
DEMO_SIZE = BUNDLES["demo"].default_size
_DEMO: dict[Component, UNetConfig | VQConfig] = {
    "prior": UNET_VARIANTS["demo_prior"],
    "decoder": UNET_VARIANTS["demo_decoder"],
    "vqgan": VQ_VARIANTS["demo_vqgan"],
}
#: The ComfyUI bundle part that holds each component.
_BUNDLE_PART: dict[Component, str] = {"prior": "unet", "decoder": "unet", "vqgan": "stage_a"}


def native_size(sources: ModelSources) -> int | None:
    """The output side of the models ``sources`` name: the bundle's (demo 128, else 1024) when the
    bundle supplies Stage C, 128 for a ``--prior`` of the demo's architecture, else None (unknown)."""
    if sources.prior is None:
        return sources.bundle.default_size
    return model_native_size(sources.prior, "prior")


def model_native_size(spec: str | Path, component: Component) -> int | None:
    """128 when the ``component`` model at ``spec`` (a file or folder, see the module docstring) has the
    demo's architecture, else None."""
    config = _local_config(Path(spec), component)
    return config_native_size(config, component) if config is not None else None


def config_native_size(config: UNetConfig | VQConfig, component: Component) -> int | None:
    """128 when ``config`` has the structure of the demo's ``component``, else None."""
    demo = _DEMO[component]
    if isinstance(config, UNetConfig) and isinstance(demo, UNetConfig):
        return DEMO_SIZE if released_unet_config(config) is demo else None
    if isinstance(config, VQConfig) and isinstance(demo, VQConfig):
        return DEMO_SIZE if dataclasses.replace(config, scale_factor=demo.scale_factor) == demo else None
    return None


def _local_config(path: Path, component: Component) -> UNetConfig | VQConfig | None:
    cls = VQConfig if component == "vqgan" else UNetConfig
    try:
        if path.is_dir():
            folder = path / component if (path / MODEL_INDEX).is_file() else path
            return cls.from_dict(read_json_object(folder / "config.json"), str(folder))
        if path.suffix == ".json" and path.is_file():
            return cls.from_dict(read_json_object(path), str(path))
        if path.suffix == ".safetensors" and path.is_file():
            shapes = read_header(path).shapes
            identity = identify(shapes)
            if identity.kind is Kind.COMFY_BUNDLE:
                identity = identify(split_bundle(shapes).get(_BUNDLE_PART[component], {}))
            return identity.config if isinstance(identity.config, cls) else None
    except (CheckpointError, OSError, TypeError, ValueError):
        return None  # loading the model reports what is wrong with it
    return None
