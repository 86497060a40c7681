"""The choices the command line offers, as light constants: the parsers are built without importing
torch or the models (``--help`` and argument errors answer at once). A test keeps them equal to the
library's own tables."""

from __future__ import annotations

#: ``diffusion.samplers.SAMPLERS``
SAMPLERS = ("ddim", "ddpm", "dpmpp_2m", "euler_ancestral")
#: ``diffusion.presets.PRESETS``
PRESETS = ("diffusers", "reference")
#: ``loading.bundles.BUNDLES``: name → description
BUNDLES = {
    "full": "Stable Cascade: Stage C 3.6B + Stage B 1.5B (Hub)",
    "lite": "Stable Cascade lite: Stage C 1B + Stage B 700M (Hub)",
    "demo": "the demo cascade shipped with the package: 128x128 coloured shapes, offline",
}
#: ``loading.bundles.DEFAULT_BUNDLE``
DEFAULT_BUNDLE = "full"
#: ``engine.DTYPES``
DTYPES = ("auto", "bf16", "fp16", "fp32")
#: ``loading.sources.ModelSources``' fields: the model flags
MODEL_FLAGS = ("model", "prior", "decoder", "stage_a", "effnet", "previewer", "components")
OFFLOADS = ("none", "model", "sequential")
#: ``pipelines.control.CONTROL_TYPES``, also ``loading.bundles.RELEASED_CONTROLNETS`` (the released names)
CONTROL_TYPES = ("canny", "inpainting", "super_resolution")
#: ``training.config``: ``Task``, ``ControlNetKind``, ``LossWeighting``, ``MixedPrecision``,
#: ``ReconstructionLoss``
TRAIN_TASKS = ("stage-c", "stage-b", "stage-a", "lora", "previewer", "controlnet")
CONTROLNET_KINDS = ("canny", "inpainting", "super_resolution", "simple")
LOSS_WEIGHTINGS = ("p2", "adaptive", "none")
MIXED_PRECISIONS = ("no", "bf16")
RECONSTRUCTION_LOSSES = ("mse", "l1")
#: ``training.config.DEFAULT_BUCKET_RATIOS``
DEFAULT_BUCKET_RATIOS: tuple[float, ...] = (1.0, 4 / 5, 3 / 4, 2 / 3, 3 / 5, 9 / 16, 1 / 2)
