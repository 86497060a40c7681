"""Batch generation: the images of many prompts, on one process or many (``torchrun``), resumable.

    summary = generate_batch("prompts.txt", "out/", settings={"models": ModelSources(model="demo")})

See :mod:`~stable_cascade.batch.items` for the PROMPTS formats, :mod:`~stable_cascade.batch.plan` for
seeds and how images are batched, and :mod:`~stable_cascade.batch.store` for what ``OUT/`` holds.
"""

from stable_cascade.batch.generate import BatchSummary, generate_batch
from stable_cascade.batch.items import OVERRIDES, BatchItem, read_items
from stable_cascade.batch.plan import SEED_STRIDE, item_seed

__all__ = [
    "OVERRIDES",
    "SEED_STRIDE",
    "BatchItem",
    "BatchSummary",
    "generate_batch",
    "item_seed",
    "read_items",
]
