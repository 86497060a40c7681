"""stable-cascade: Stable Cascade (Würstchen v3) text-to-image, diffusers-compatible and fast."""

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.diffusion.scheduler import DDPMWuerstchenScheduler, DDPMWuerstchenSchedulerOutput
from stable_cascade.nn.controlnet import ControlNet
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

__all__ = [
    "PRESETS",
    "UNET_VARIANTS",
    "VQ_VARIANTS",
    "CheckpointError",
    "ControlNet",
    "DDPMWuerstchenScheduler",
    "DDPMWuerstchenSchedulerOutput",
    "ImagePipelineOutput",
    "PaellaVQModel",
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
