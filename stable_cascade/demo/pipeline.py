"""The demo cascade's combined pipeline: the diffusers-compatible one, at the demo's native size."""

from __future__ import annotations

import logging
from typing import Any

from stable_cascade.demo.settings import DEMO_SIZE
from stable_cascade.pipelines.combined import StableCascadeCombinedPipeline

logger = logging.getLogger(__name__)


class DemoCascadePipeline(StableCascadeCombinedPipeline):
    """:class:`StableCascadeCombinedPipeline` whose images are 128² unless ``height``/``width`` say
    otherwise (diffusers' combined default, 512², is four times the size the demo was trained at)."""

    def __call__(self, *args: Any, height: int = DEMO_SIZE, width: int = DEMO_SIZE, **kwargs: Any) -> Any:
        if (height, width) != (DEMO_SIZE, DEMO_SIZE):
            logger.warning(
                "the demo cascade was trained at %dx%d; at %dx%d its images are poorer",
                DEMO_SIZE,
                DEMO_SIZE,
                width,
                height,
            )
        kwargs.update(height=height, width=width)
        return super().__call__(*args, **kwargs)
