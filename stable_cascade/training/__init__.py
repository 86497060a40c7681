"""Training Stage C, Stage B, Stage A and Stage C LoRA adapters (``stable-cascade train``).

from stable_cascade.training import TrainConfig, train
final = train(TrainConfig(task="stage-c", data="images/", output_dir="runs/c", pretrained="prior/"))
"""

from stable_cascade.training.components import Components, fresh_model, load_components
from stable_cascade.training.config import DEFAULT_BUCKET_RATIOS, TrainConfig
from stable_cascade.training.data import BucketBatchSampler, find_examples
from stable_cascade.training.ema import EMA
from stable_cascade.training.objective import LossWeights, diffuse
from stable_cascade.training.registry import make_task
from stable_cascade.training.tasks import Task
from stable_cascade.training.trainer import train

__all__ = [
    "DEFAULT_BUCKET_RATIOS",
    "EMA",
    "BucketBatchSampler",
    "Components",
    "LossWeights",
    "Task",
    "TrainConfig",
    "diffuse",
    "find_examples",
    "fresh_model",
    "load_components",
    "make_task",
    "train",
]
