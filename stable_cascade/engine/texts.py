"""Text embeddings of a model call's rows: each distinct text encoded once, alone, and kept.

A text is encoded alone (as a job of one prompt encodes it), so a row's embeddings are the same
whether its call holds one job or rows of many; the last :data:`CACHED_TEXTS` texts are kept (per
prior pipeline and per set of attached LoRAs, which adapt the text encoder too), so a negative prompt
shared by a run's jobs is encoded once.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from stable_cascade.conditioning.text import TextEmbeddings
from stable_cascade.engine.job import Row
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

CACHED_TEXTS = 256


class TextCache:
    """Encodes texts with a prior pipeline's text encoder; ``encoded`` counts the texts encoded."""

    def __init__(self, size: int = CACHED_TEXTS) -> None:
        self.size = size
        self.encoded = 0
        self._texts: collections.OrderedDict[tuple[Hashable, str], TextEmbeddings] = collections.OrderedDict()
        self._encoder: StableCascadePriorPipeline | None = None  # whose embeddings _texts holds

    def embeddings(
        self, prior: StableCascadePriorPipeline, texts: Sequence[str], context: Hashable = ()
    ) -> TextEmbeddings:
        """Each text's embeddings, one row each; ``context`` tells apart encoders adapted differently."""
        if prior is not self._encoder:  # other models (or the same ones loaded again)
            self._texts.clear()
            self._encoder = prior
        for text in dict.fromkeys(texts):
            key = (context, text)
            if key in self._texts:
                self._texts.move_to_end(key)
                continue
            self._texts[key] = prior.text_conditioning(prompt=text, guidance=False).cond
            self.encoded += 1
            while len(self._texts) > self.size:
                self._texts.popitem(last=False)
        rows = [self._texts[context, text] for text in texts]
        return TextEmbeddings(torch.cat([r.hidden for r in rows]), torch.cat([r.pooled for r in rows]))

    def arguments(
        self, prior: StableCascadePriorPipeline, rows: Sequence[Row], guided: bool
    ) -> dict[str, Any]:
        """The prior pipeline's text arguments for ``rows``: their prompts' embeddings and, with
        guidance, their negative prompts'."""
        context = tuple((lora.path, lora.sha256, lora.scale) for lora in rows[0].job.loras)
        cond = self.embeddings(prior, [row.job.prompt for row in rows], context)
        arguments: dict[str, Any] = {"prompt_embeds": cond.hidden, "prompt_embeds_pooled": cond.pooled}
        if guided:
            uncond = self.embeddings(prior, [row.job.negative_prompt for row in rows], context)
            arguments.update(
                negative_prompt_embeds=uncond.hidden, negative_prompt_embeds_pooled=uncond.pooled
            )
        return arguments
