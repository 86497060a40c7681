"""Making one unit's images: a batched text-to-image call, or one engine job.

A batched call runs the prior and then the decoder pipeline on the engine's cached models, as the
engine does for one job (Stage B takes the prior's text embeddings), with one row per image: its own
prompt's embeddings and its own generator (``seed + k``). Each distinct text is encoded once, alone
(as a job of one prompt encodes it), and kept for the next units that use it.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator, Sequence
from typing import Any, cast

import PIL.Image
import torch

from stable_cascade.batch.plan import PlannedItem
from stable_cascade.conditioning.text import TextEmbeddings
from stable_cascade.engine import Engine, ImageDone, ImageRecord, Job, attached_loras, open_image
from stable_cascade.pipelines.outputs import ImagePipelineOutput, StableCascadePriorPipelineOutput
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

#: Distinct texts whose embeddings are kept (a negative prompt shared by all items stays).
CACHED_TEXTS = 256


class UnitRunner:
    """Makes units' images on ``engine``; yields ``(item index, image k, image, record)``, the record's job
    from ``record_job``."""

    def __init__(self, engine: Engine, record_job: Callable[[Job], Job]) -> None:
        self.engine, self.record_job = engine, record_job
        self._texts: collections.OrderedDict[str, TextEmbeddings] = collections.OrderedDict()
        self._encoder: StableCascadePriorPipeline | None = None  # whose embeddings _texts holds
        self.encoded = 0  # texts run through the text encoder

    def run(
        self, images: Sequence[tuple[int, int]], items: Sequence[PlannedItem], batched: bool
    ) -> Iterator[tuple[int, int, PIL.Image.Image, ImageRecord]]:
        if not batched:
            (index,) = {i for i, _ in images}  # one item: its job
            entry = items[index]
            input_image = open_image(entry.item.overrides["image"]) if entry.job.task != "txt2img" else None
            for event in self.engine.run(entry.job, input_image):
                if isinstance(event, ImageDone):
                    yield entry.index, event.index, event.image, event.record
            return
        rows = [(items[i], k) for i, k in images]
        for (entry, k), (picture, record) in zip(rows, self._batched(rows), strict=True):
            yield entry.index, k, picture, record

    def _batched(self, rows: list[tuple[PlannedItem, int]]) -> list[tuple[PIL.Image.Image, ImageRecord]]:
        """One prior call and one decoder call for images of jobs that share all but prompts and seeds."""
        job = rows[0][0].job
        assert job.prior is not None, "batched units are text-to-image"
        models = self.engine.load(job.models, job.dtype)
        prior = models.prior_pipe
        assert prior is not None
        seeds = [entry.job.seed + k for entry, k in rows]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        cond = self._embeddings(prior, [entry.job.prompt for entry, _ in rows])
        arguments: dict[str, Any] = {"prompt_embeds": cond.hidden, "prompt_embeds_pooled": cond.pooled}
        if job.prior.guidance > 1:
            uncond = self._embeddings(prior, [entry.job.negative_prompt for entry, _ in rows])
            arguments.update(
                negative_prompt_embeds=uncond.hidden, negative_prompt_embeds_pooled=uncond.pooled
            )
        arguments.update(height=job.height, width=job.width, generator=generators)
        with attached_loras(models, job.loras):
            out = prior(**arguments, **job.prior.arguments(job.preset))
        assert isinstance(out, StableCascadePriorPipelineOutput)
        handed_on = {
            **out.decoder_arguments(),
            "height": job.height,
            "width": job.width,
            "generator": generators,
        }
        decoded = models.decoder_pipe(**handed_on, **job.decoder.arguments(job.preset))
        assert isinstance(decoded, ImagePipelineOutput)
        pictures = cast(list[PIL.Image.Image], decoded.images)  # output_type "pil", the default
        hashes = self.engine.model_sha256(models)
        records = [
            ImageRecord(
                job=self.record_job(entry.job),
                index=k,
                seed=seed,
                width=picture.width,
                height=picture.height,
                model_sha256=hashes,
            )
            for (entry, k), seed, picture in zip(rows, seeds, pictures, strict=True)
        ]
        return list(zip(pictures, records, strict=True))

    def _embeddings(self, prior: StableCascadePriorPipeline, texts: list[str]) -> TextEmbeddings:
        """Each text's embeddings (one row each), encoded once per distinct text."""
        if prior is not self._encoder:  # other models (or the same ones loaded again)
            self._texts.clear()
            self._encoder = prior
        for text in dict.fromkeys(texts):
            if text in self._texts:
                self._texts.move_to_end(text)
                continue
            self._texts[text] = prior.text_conditioning(prompt=text, guidance=False).cond
            self.encoded += 1
            while len(self._texts) > CACHED_TEXTS:
                self._texts.popitem(last=False)
        rows = [self._texts[text] for text in texts]
        return TextEmbeddings(torch.cat([r.hidden for r in rows]), torch.cat([r.pooled for r in rows]))
