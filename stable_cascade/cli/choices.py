"""The choices of the command line's non-job options, as light constants: the parsers are built without
importing torch or the models (``--help`` and argument errors answer at once). A test keeps them equal
to the library's own tables. (The job options' choices come from the field table, which is light.)"""

from __future__ import annotations

#: ``engine.models.Offload``
OFFLOADS = ("none", "model", "sequential")
#: ``training.config``: ``Task``, ``ControlNetKind``, ``LossWeighting``, ``MixedPrecision``,
#: ``ReconstructionLoss``, ``LCMStage``, ``LCMLoss``
TRAIN_TASKS = ("stage-c", "stage-b", "stage-a", "lora", "previewer", "controlnet", "lcm")
CONTROLNET_KINDS = ("canny", "inpainting", "super_resolution", "simple")
LOSS_WEIGHTINGS = ("p2", "adaptive", "none")
MIXED_PRECISIONS = ("no", "bf16")
RECONSTRUCTION_LOSSES = ("mse", "l1")
LCM_STAGES = ("c", "b")
LCM_LOSSES = ("huber", "l2")
#: ``training.config.DEFAULT_BUCKET_RATIOS``
DEFAULT_BUCKET_RATIOS: tuple[float, ...] = (1.0, 4 / 5, 3 / 4, 2 / 3, 3 / 5, 9 / 16, 1 / 2)
