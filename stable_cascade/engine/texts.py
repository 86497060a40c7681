"""Text embeddings of a model call's rows: each distinct text encoded once, alone, and kept.

A text is encoded alone (as a job of one prompt encodes it), so a row's embeddings are the same
whether its call holds one job or rows of many; the last :data:`CACHED_TEXTS` texts are kept (per
prior pipeline, per set of attached LoRAs, which adapt the text encoder too, and per emphasis), so a
negative prompt shared by a run's jobs is encoded once. Prompts in AUTOMATIC1111's weighting syntax
are encoded by :mod:`~stable_cascade.conditioning.emphasis`.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable, Sequence
from typing import Any, cast

import torch

from stable_cascade.conditioning.emphasis import Emphasis, encode_weighted, is_plain
from stable_cascade.conditioning.text import TextEmbeddings
from stable_cascade.engine.job import Row
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

CACHED_TEXTS = 256


class TextCache:
    """Encodes texts with a prior pipeline's text encoder; ``encoded`` counts the texts encoded."""

    def __init__(self, size: int = CACHED_TEXTS) -> None:
        self.size = size
        self.encoded = 0
        self._texts: collections.OrderedDict[tuple[Hashable, str, str], TextEmbeddings] = (
            collections.OrderedDict()
        )
        self._encoder: StableCascadePriorPipeline | None = None  # whose embeddings _texts holds

    def embeddings(
        self,
        prior: StableCascadePriorPipeline,
        texts: Sequence[str],
        context: Hashable = (),
        emphasis: Emphasis = "none",
    ) -> list[TextEmbeddings]:
        """Each text's embeddings (prompt weighting as ``emphasis`` says, see
        :mod:`~stable_cascade.conditioning.emphasis`); ``context`` tells apart encoders adapted
        differently."""
        if prior is not self._encoder:  # other models (or the same ones loaded again)
            self._texts.clear()
            self._encoder = prior
        for text in dict.fromkeys(texts):
            key = (context, emphasis, text)
            if key in self._texts:
                self._texts.move_to_end(key)
                continue
            self._texts[key] = _encoded(prior, text, emphasis)
            self.encoded += 1
            while len(self._texts) > self.size:
                self._texts.popitem(last=False)
        return [self._texts[context, emphasis, text] for text in texts]

    def arguments(
        self, prior: StableCascadePriorPipeline, rows: Sequence[Row], guided: bool
    ) -> dict[str, Any]:
        """The prior pipeline's text arguments for ``rows``: their prompts' embeddings and, with
        guidance, their negative prompts' (weighted prompts of several chunks padded with the empty
        prompt's chunks to the longest, as AUTOMATIC1111 pads them)."""
        job = rows[0].job
        context = tuple((lora.path, lora.sha256, lora.scale) for lora in job.loras)
        emphasis = cast(Emphasis, job.emphasis)
        texts = [row.job.prompt for row in rows] + (
            [row.job.negative_prompt for row in rows] if guided else []
        )
        encoded = self.embeddings(prior, texts, context, emphasis)
        longest = max(e.hidden.shape[1] for e in encoded)
        if any(e.hidden.shape[1] < longest for e in encoded):
            (empty,) = self.embeddings(prior, [""], context, emphasis)
            encoded = [_padded(e, empty.hidden, longest) for e in encoded]
        cond = _stacked(encoded[: len(rows)])
        arguments: dict[str, Any] = {"prompt_embeds": cond.hidden, "prompt_embeds_pooled": cond.pooled}
        if guided:
            uncond = _stacked(encoded[len(rows) :])
            arguments.update(
                negative_prompt_embeds=uncond.hidden, negative_prompt_embeds_pooled=uncond.pooled
            )
        return arguments


def _encoded(prior: StableCascadePriorPipeline, text: str, emphasis: Emphasis) -> TextEmbeddings:
    """A text's embeddings: a plain one (or any, with emphasis ``none``) as the pipeline encodes it."""
    if emphasis == "none" or is_plain(text):
        return prior.text_conditioning(prompt=text, guidance=False).cond
    text_encoder = prior.activate("text_encoder")
    return encode_weighted(prior.tokenizer, text_encoder, text, emphasis, prior.execution_device)


def _padded(embeddings: TextEmbeddings, empty: torch.Tensor, length: int) -> TextEmbeddings:
    """``embeddings`` followed by the empty prompt's chunk until it is ``length`` tokens long."""
    hidden = embeddings.hidden
    while hidden.shape[1] < length:
        hidden = torch.cat([hidden, empty], dim=1)
    return TextEmbeddings(hidden, embeddings.pooled)


def _stacked(rows: list[TextEmbeddings]) -> TextEmbeddings:
    return TextEmbeddings(torch.cat([r.hidden for r in rows]), torch.cat([r.pooled for r in rows]))
