"""The training tasks by name (``TrainConfig.task``), as data."""

from __future__ import annotations

from stable_cascade.training.components import Components
from stable_cascade.training.config import TrainConfig
from stable_cascade.training.controlnet_task import ControlNetStageC
from stable_cascade.training.lcm_task import LCMDistillation
from stable_cascade.training.lora_task import LoRAStageC
from stable_cascade.training.tasks import PreviewerTask, StageA, StageB, StageC, Task

TASKS: dict[str, type[Task]] = {
    "stage-c": StageC,
    "stage-b": StageB,
    "stage-a": StageA,
    "previewer": PreviewerTask,
    "controlnet": ControlNetStageC,
    "lora": LoRAStageC,
    "lcm": LCMDistillation,
}


def make_task(config: TrainConfig, parts: Components) -> Task:
    """The task ``config.task`` on ``parts`` (which it modifies: freezing, LoRA adapters)."""
    return TASKS[config.task](config, parts)
