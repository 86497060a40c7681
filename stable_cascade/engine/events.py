"""What :meth:`Engine.run <stable_cascade.engine.engine.Engine.run>` reports while a job runs."""

from __future__ import annotations

import dataclasses
from typing import Literal

import PIL.Image

from stable_cascade.engine.record import ImageRecord


class JobCancelled(Exception):
    """The job's ``cancel`` event was set; raised between denoising steps."""


class BatchSkipped(Exception):
    """The job's ``skip`` event was set: the batch being made is dropped, the job goes on with the next."""


@dataclasses.dataclass(frozen=True)
class Loading:
    """Models are being loaded (only when the job's models are not loaded yet)."""

    models: str


@dataclasses.dataclass(frozen=True)
class Progress:
    """A denoising step finished; ``fraction`` of the whole job's steps (both stages, every batch)."""

    stage: Literal["prior", "decoder"]
    step: int  # 1-based within this stage of this batch
    steps: int
    batch: int  # 0-based
    batches: int
    fraction: float


@dataclasses.dataclass(frozen=True)
class Preview:
    """Stage C's current estimate of image ``index`` (only with ``previews=True``)."""

    index: int
    step: int
    image: PIL.Image.Image


@dataclasses.dataclass(frozen=True)
class ImageDone:
    index: int
    image: PIL.Image.Image
    record: ImageRecord


@dataclasses.dataclass(frozen=True)
class Finished:
    """Seconds spent in Stage C, in Stage B + A and loading models, over the whole job."""

    prior_seconds: float
    decoder_seconds: float
    load_seconds: float


Event = Loading | Progress | Preview | ImageDone | Finished
