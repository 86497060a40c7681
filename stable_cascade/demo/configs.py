"""The training settings every step of the demo recipe shares, and each step's own on top."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stable_cascade.demo.settings import DEMO_SIZE, Recipe
from stable_cascade.training import TrainConfig


def train_config(recipe: Recipe, task: str, data: Path, out: Path, **changes: Any) -> TrainConfig:
    """A demo step's config: the recipe's size, batch, learning rate, EMA, seed and logging, then
    ``changes``."""
    shared: dict[str, Any] = {
        "resolution": DEMO_SIZE,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "warmup_steps": 100,
        "ema_decay": recipe.ema_decay,
        "checkpoint_every": 1_000,
        "log_every": 100,
        "seed": recipe.seed,
    }
    return TrainConfig(task=task, data=data, output_dir=out, **{**shared, **changes})  # type: ignore[arg-type]
