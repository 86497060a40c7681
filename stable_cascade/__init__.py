"""stable-cascade: Stable Cascade (Würstchen v3) text-to-image, diffusers-compatible and fast.

The exported names load on first use (PEP 562), so that ``import stable_cascade.cli`` (``--help``,
argument errors) does not import torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stable_cascade.checkpoint import CheckpointError
    from stable_cascade.conditioning.image import ImagePrompt
    from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler, DDPMWuerstchenSchedulerOutput
    from stable_cascade.nn.controlnet import ControlNet
    from stable_cascade.nn.effnet import EfficientNetEncoder
    from stable_cascade.nn.ip_adapter import IPAdapter
    from stable_cascade.nn.previewer import Previewer
    from stable_cascade.nn.stage_a import PaellaVQModel
    from stable_cascade.nn.unet import StableCascadeUNet, StableCascadeUNetOutput
    from stable_cascade.pipelines import (
        PRESETS,
        ImagePipelineOutput,
        StableCascadeCombinedPipeline,
        StableCascadeDecoderPipeline,
        StableCascadePriorPipeline,
        StableCascadePriorPipelineOutput,
        StageSettings,
    )
    from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS, SchedulerConfig, UNetConfig, VQConfig

__version__ = "0.1.0"

#: Exported name → the module that defines it.
_EXPORTS = {
    "CheckpointError": "stable_cascade.checkpoint",
    "ImagePrompt": "stable_cascade.conditioning.image",
    "IPAdapter": "stable_cascade.nn.ip_adapter",
    "DDPMWuerstchenScheduler": "stable_cascade.diffusion.ddpm_scheduler",
    "DDPMWuerstchenSchedulerOutput": "stable_cascade.diffusion.ddpm_scheduler",
    "ControlNet": "stable_cascade.nn.controlnet",
    "EfficientNetEncoder": "stable_cascade.nn.effnet",
    "Previewer": "stable_cascade.nn.previewer",
    "PaellaVQModel": "stable_cascade.nn.stage_a",
    "StableCascadeUNet": "stable_cascade.nn.unet",
    "StableCascadeUNetOutput": "stable_cascade.nn.unet",
    "PRESETS": "stable_cascade.pipelines",
    "ImagePipelineOutput": "stable_cascade.pipelines",
    "StableCascadeCombinedPipeline": "stable_cascade.pipelines",
    "StableCascadeDecoderPipeline": "stable_cascade.pipelines",
    "StableCascadePriorPipeline": "stable_cascade.pipelines",
    "StableCascadePriorPipelineOutput": "stable_cascade.pipelines",
    "StageSettings": "stable_cascade.pipelines",
    "UNET_VARIANTS": "stable_cascade.specs",
    "VQ_VARIANTS": "stable_cascade.specs",
    "SchedulerConfig": "stable_cascade.specs",
    "UNetConfig": "stable_cascade.specs",
    "VQConfig": "stable_cascade.specs",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'stable_cascade' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "PRESETS",
    "UNET_VARIANTS",
    "VQ_VARIANTS",
    "CheckpointError",
    "ControlNet",
    "DDPMWuerstchenScheduler",
    "DDPMWuerstchenSchedulerOutput",
    "EfficientNetEncoder",
    "IPAdapter",
    "ImagePipelineOutput",
    "ImagePrompt",
    "PaellaVQModel",
    "Previewer",
    "SchedulerConfig",
    "StableCascadeCombinedPipeline",
    "StableCascadeDecoderPipeline",
    "StableCascadePriorPipeline",
    "StableCascadePriorPipelineOutput",
    "StableCascadeUNet",
    "StableCascadeUNetOutput",
    "StageSettings",
    "UNetConfig",
    "VQConfig",
]
