"""Making one unit's images on the engine: a batched call of rows of several items' jobs
(:meth:`Engine.generate`), or one item's job (:meth:`Engine.run`).

The engine encodes each distinct text once, alone, and keeps it for the next units that use it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import PIL.Image

from stable_cascade.batch.plan import PlannedItem
from stable_cascade.engine import Engine, ImageDone, ImageRecord, Row, open_image


class UnitRunner:
    """Makes units' images on ``engine``; yields ``(item index, image k, image, record)``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    @property
    def encoded(self) -> int:
        """Texts run through the text encoder so far."""
        return self.engine.texts.encoded

    def run(
        self, images: Sequence[tuple[int, int]], items: Sequence[PlannedItem], batched: bool
    ) -> Iterator[tuple[int, int, PIL.Image.Image, ImageRecord]]:
        if batched:
            rows = [Row(items[i].job, k) for i, k in images]
            for (i, k), done in zip(images, self.engine.generate(rows), strict=True):
                yield items[i].index, k, done.image, done.record
            return
        (index,) = {i for i, _ in images}  # one item: its job
        entry = items[index]
        image = entry.item.overrides.get("input_image")
        input_image = open_image(image) if image is not None else None
        for event in self.engine.run(entry.job, input_image):
            if isinstance(event, ImageDone):
                yield entry.index, event.index, event.image, event.record
