"""The demo's image encoder: a small CLIP vision tower trained contrastively against the demo's own text
encoder on the shapes data, so that its image embeddings prompt the demo Stage C as CLIP ViT-L/14's
prompt the released one.

The text encoder stays frozen (it is the one Stage C reads); the vision tower and its projection learn
CLIP's symmetric contrastive loss with a learned temperature, where images with the same caption (the
same scene, other jitter) count as matches of each other's captions. Images are read as the pipelines
read them: through the shipped ``feature_extractor`` (a ``CLIPImageProcessor``: bicubic resize to
64², CLIP's mean and std).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
)

from stable_cascade.checkpoint.atomic import atomic_folder
from stable_cascade.conditioning.text import encode_text
from stable_cascade.shapes import Scene, caption, render
from stable_cascade.training.data import find_examples

logger = logging.getLogger(__name__)

IMAGE_SIZE = 64  # the encoder's input side: the demo's 128² images at half size
PATCH_SIZE = 16  # 16×16 patches: 16 tokens
PREPROCESS_CHUNK = 512  # images per feature-extractor call while preparing the data


@dataclasses.dataclass(frozen=True)
class EncoderTraining:
    """One contrastive run: its length, batch, learning rate, seed and how many images it reads."""

    steps: int = 1_500
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    images: int = 10_000  # the first images of the data set


def image_encoder_config(projection_dim: int) -> CLIPVisionConfig:
    """A 4-layer, 128-wide ViT on 64² images whose embedding has the text encoder's width."""
    return CLIPVisionConfig(
        hidden_size=128,
        intermediate_size=512,
        num_attention_heads=4,
        num_hidden_layers=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=projection_dim,
    )


def feature_extractor() -> CLIPImageProcessor:
    """CLIP's preprocessing (bicubic resize, centre crop, CLIP mean and std) at the encoder's size."""
    return CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )


def train_image_encoder(
    data: Path,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModelWithProjection,
    out: Path,
    run: EncoderTraining | None = None,
) -> Path:
    """Train a fresh encoder on the captioned images of ``data``; writes ``out/image_encoder`` and
    ``out/feature_extractor`` (as a prior pipeline folder holds them) and returns ``out``."""
    run = run or EncoderTraining()
    examples = find_examples(Path(data))[: run.images]
    processor = feature_extractor()
    captions = [example.caption for example in examples]
    distinct = sorted(set(captions))
    index = {text: i for i, text in enumerate(distinct)}
    pixels = _pixels(processor, [example.image.read().convert("RGB") for example in examples])
    targets = F.normalize(_text_embeddings(tokenizer, text_encoder, distinct), dim=-1)  # (T, C)
    labels = torch.tensor([index[text] for text in captions])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(run.seed)
        encoder = CLIPVisionModelWithProjection(image_encoder_config(targets.shape[-1]))
    logit_scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    parameters = [*encoder.parameters(), logit_scale]
    optimizer = torch.optim.AdamW(parameters, lr=run.lr, weight_decay=0.01)
    warmup = max(1, run.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / run.steps)),
    )
    generator = torch.Generator().manual_seed(run.seed)
    encoder.train()
    for step in range(run.steps):
        chosen = torch.randperm(len(examples), generator=generator)[: run.batch_size]
        embeddings = F.normalize(encoder(pixels[chosen].float()).image_embeds, dim=-1)  # (B, C)
        loss = contrastive_loss(embeddings, targets, labels[chosen], logit_scale.exp().clamp(max=100))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0 or step == run.steps - 1:
            logger.info("image encoder step %d: loss %.4f", step, loss.item())
    with atomic_folder(Path(out), replace=True) as folder:
        encoder.eval().save_pretrained(folder / "image_encoder", safe_serialization=True)
        processor.save_pretrained(folder / "feature_extractor")
    return Path(out)


def contrastive_loss(images: Tensor, texts: Tensor, labels: Tensor, scale: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy between normalised image embeddings (B, C) and the captions'
    (rows ``labels`` of ``texts``); images of the same caption are each other's matches too."""
    logits = scale * images @ texts[labels].T  # (B, B)
    same = (labels[:, None] == labels[None, :]).float()
    target = same / same.sum(dim=1, keepdim=True)
    return 0.5 * (_soft_cross_entropy(logits, target) + _soft_cross_entropy(logits.T, target))


def _soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    return -(target * logits.log_softmax(dim=-1)).sum(dim=-1).mean()


def _pixels(processor: CLIPImageProcessor, images: Sequence[PIL.Image.Image]) -> Tensor:
    """The encoder's inputs (N, 3, 64, 64), float16 to halve the memory they hold."""
    chunks = [
        processor(list(images[i : i + PREPROCESS_CHUNK]), return_tensors="pt").pixel_values.half()
        for i in range(0, len(images), PREPROCESS_CHUNK)
    ]
    return torch.cat(chunks)


@torch.no_grad()
def _text_embeddings(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, texts: Sequence[str]
) -> Tensor:
    """The pooled, projected text embeddings (T, C) Stage C reads as ``clip_text_pooled``."""
    rows = [
        encode_text(tokenizer, text_encoder, list(texts[i : i + 256]), "cpu").pooled[:, 0]
        for i in range(0, len(texts), 256)
    ]
    return torch.cat(rows)


@torch.no_grad()
def retrieval_accuracy(
    encoder: CLIPVisionModelWithProjection,
    processor: CLIPImageProcessor,
    tokenizer: CLIPTokenizer,
    text_encoder: CLIPTextModelWithProjection,
    scenes: Sequence[Scene],
    seed: int = 0,
) -> float:
    """Share of renders of ``scenes`` (jittered, 128²) whose most similar caption among the scenes'
    captions is their own: image → text retrieval."""
    rng = np.random.default_rng(seed)
    captions = [caption(scene) for scene in scenes]
    pixels = _pixels(processor, [render(scene, 128, rng) for scene in scenes]).float()
    images = F.normalize(encoder.eval()(pixels).image_embeds, dim=-1)
    texts = F.normalize(_text_embeddings(tokenizer, text_encoder, captions), dim=-1)
    best = (images @ texts.T).argmax(dim=-1)
    right = [captions[int(j)] == captions[i] for i, j in enumerate(best)]
    return sum(right) / len(right)
