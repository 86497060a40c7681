"""The prior (Stage C), decoder (Stage B + A) and combined pipelines, drop-ins for diffusers'."""

from stable_cascade.diffusion.presets import PRESETS, StageSettings
from stable_cascade.pipelines.combined import StableCascadeCombinedPipeline
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.outputs import ImagePipelineOutput, StableCascadePriorPipelineOutput
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

__all__ = [
    "PRESETS",
    "ImagePipelineOutput",
    "StableCascadeCombinedPipeline",
    "StableCascadeDecoderPipeline",
    "StableCascadePriorPipeline",
    "StableCascadePriorPipelineOutput",
    "StageSettings",
]
