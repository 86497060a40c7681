"""From items to work: each item's job and files, and the units (model calls) that make them.

Seeds: item ``i`` without a ``seed`` of its own gets ``base_seed + 100000 · i``, and its image ``k``
(of ``count``) gets that seed ``+ k``, as in any job. 100,000 is the most images one job may have, so
no two images of a run share a seed, and an item's seed never depends on how many processes run.

Units: the text-to-image images of items with the same settings (everything but prompt, negative
prompt and seed) are made ``batch_size`` at a time, in item order; every other item is one engine job.
Units are fixed by the items and the batch size alone, so every image comes out of the same model
call (bit for bit the same image) whichever process runs it, however many run.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from stable_cascade.batch.items import BatchItem
from stable_cascade.engine import Job, image_sha256, open_image
from stable_cascade.fields import BY_NAME
from stable_cascade.fields.checks import MAX_COUNT

SEED_STRIDE = MAX_COUNT  # the most images one item (job) may have


def item_seed(base_seed: int, index: int) -> int:
    """The seed of item ``index`` that gives none: ``base_seed + 100000 · index``."""
    return base_seed + SEED_STRIDE * index


@dataclasses.dataclass(frozen=True)
class PlannedItem:
    """Item ``index``: its job (one image a batch, ``count`` batches) and where its images go."""

    index: int
    item: BatchItem
    job: Job

    @property
    def files(self) -> tuple[str, ...]:
        """``000123.png`` for an item of one image; ``000123_0.png``, ``000123_1.png``, … for more."""
        if self.job.count == 1:
            return (f"{self.index:06d}.png",)
        return tuple(f"{self.index:06d}_{k}.png" for k in range(self.job.count))

    @property
    def batched(self) -> bool:
        """Text-to-image without a ControlNet: its images join other items' in batched calls."""
        return self.job.task == "txt2img" and not self.job.controls


@dataclasses.dataclass(frozen=True)
class Unit:
    """What one step of one process makes: images ``(item, k)``, by one batched call or engine job."""

    number: int
    images: tuple[tuple[int, int], ...]
    batched: bool


def plan_items(items: Sequence[BatchItem], settings: Mapping[str, Any], base_seed: int) -> list[PlannedItem]:
    """Each item's job: ``settings`` (``Job.create``'s arguments) with the item's overrides.

    A ``ValueError`` names the item's ``file:line``. No model is loaded.
    """
    base = Job.create(**{**settings, "seed": base_seed})  # resolves the models and hashes LoRAs once
    # The LoRAs named for the run; each item takes those its own preset needs (the lcm preset's).
    common = {**settings, "models": base.models, "loras": base.named_loras}
    planned = []
    for index, item in enumerate(items):
        try:
            job = _job(item, common, item_seed(base_seed, index))
        except (ValueError, TypeError, OSError) as error:
            raise ValueError(f"{item.where or f'item {index}'}: {error}") from None
        planned.append(PlannedItem(index, item, job))
    return planned


def _job(item: BatchItem, common: Mapping[str, Any], seed: int) -> Job:
    overrides = dict(item.overrides)
    image_path = overrides.pop("input_image", None)
    task = overrides.get("task", common.get("task") or "txt2img")
    # The run's settings that apply to the item's task (reconstruct runs no Stage C), then its own.
    values: dict[str, Any] = {
        name: value
        for name, value in common.items()
        if name not in BY_NAME or BY_NAME[name].applies(task, {**common, **overrides})
    }
    values.update(seed=seed, prompt=item.prompt, batch_size=1)
    values.update(overrides)
    if task != "txt2img":
        if image_path is None:
            raise ValueError(f"{task} needs an input image: give the item an image")
        image = open_image(image_path)
        values.update(
            input_image=Path(image_path).name, input_image_sha256=image_sha256(image), image_size=image.size
        )
    elif image_path is not None:
        raise ValueError("txt2img takes no image; set task to img2img, variation or reconstruct")
    return Job.create(**values)


def plan_units(planned: Sequence[PlannedItem], batch_size: int) -> list[Unit]:
    """The run's units in item order (see the module's docstring)."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"the batch size must be a whole number of at least 1, got {batch_size!r}")
    groups: dict[str, list[tuple[int, int]]] = {}
    units: list[tuple[tuple[int, int], ...]] = []
    engine_units: list[tuple[tuple[int, int], ...]] = []
    for entry in planned:
        images = [(entry.index, k) for k in range(entry.job.count)]
        if entry.batched:
            groups.setdefault(settings_key(entry.job), []).extend(images)
        else:
            engine_units.append(tuple(images))
    for images in groups.values():
        units.extend(tuple(images[i : i + batch_size]) for i in range(0, len(images), batch_size))
    ordered = sorted([(u, True) for u in units] + [(u, False) for u in engine_units], key=lambda u: u[0][0])
    return [Unit(number, images, batched) for number, (images, batched) in enumerate(ordered)]


def settings_key(job: Job) -> str:
    """What images of one batched call share: the job without its prompts, seed and count."""
    return dataclasses.replace(job, prompt="", negative_prompt="", seed=0, count=1).to_json()
