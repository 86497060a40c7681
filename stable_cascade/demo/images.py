"""The demo recipe's image steps: the image encoder, Stage C's image phase and the IP-Adapter.

* The image encoder (:mod:`stable_cascade.demo.image_encoder`) learns against Stage C's frozen text
  encoder, so its embeddings live where the captions' do.
* Stage C, trained on text with zero image embeddings (a prior made before these steps has no image
  mapper: it gets one, zero at first), then learns image prompts as the original trains them: the
  image's CLIP embedding for ``stage_c_image_share`` of the examples, zeros for the others. Captions
  are dropped more often in this phase (``stage_c_image_caption_dropout``), so that an image alone (a
  variation) is seen often enough in a short run.
* The IP-Adapter trains on the final prior, which stays frozen (``train ip-adapter``), on the image
  prompt data set (:mod:`stable_cascade.shapes.prompts`): variations with an empty text, recolourings
  whose text names the colour, and text-only examples. A shapes caption says everything its image
  shows, so next to its caption an image is nothing to learn from: on the ordinary data the adapter's
  variations kept 7 % of the held-out objects. (Stage C's image phase on this data set lost shapes on
  the text path — the README's blue square in 44 of 64 seeds instead of 61 — so it stays on the
  ordinary data; the adapter leaves the prior as it is.)
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from stable_cascade.demo.image_encoder import EncoderTraining, train_image_encoder
from stable_cascade.demo.settings import DEMO_SIZE, Recipe
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.shapes.prompts import write_prompt_dataset
from stable_cascade.training import Components, TrainConfig
from stable_cascade.training.components import load_components, load_text_encoder


def image_prompt_data(recipe: Recipe, out: Path) -> Path:
    """The IP-Adapter's image prompt data set in ``out``, as many examples as the recipe's data."""
    return write_prompt_dataset(out, recipe.images, size=DEMO_SIZE, seed=recipe.seed)


def image_encoder_step(recipe: Recipe, data: Path, text: Path, out: Path) -> Path:
    """The image encoder against the text encoder in ``text`` (a folder with ``text_encoder/`` and
    ``tokenizer/``); writes ``out/{image_encoder,feature_extractor}``."""
    tokenizer, text_encoder = load_text_encoder(text)
    run = EncoderTraining(
        steps=recipe.image_encoder_steps,
        batch_size=recipe.image_encoder_batch_size,
        lr=recipe.lr,
        seed=recipe.seed,
        images=min(recipe.images, recipe.image_encoder_images),
    )
    return train_image_encoder(data, tokenizer, text_encoder, out, run)


def stage_c_image_run(
    recipe: Recipe, base: TrainConfig, prior: Path, encoder: Path
) -> tuple[TrainConfig, Components]:
    """Stage C's image phase from the prior pipeline folder ``prior`` with the image encoder in
    ``encoder``; ``base``: the recipe's Stage C settings (data, output folder, sizes)."""
    config = base.replace(
        pretrained=prior,
        steps=recipe.stage_c_image_steps,
        image_conditioning=recipe.stage_c_image_share,
        caption_dropout=recipe.stage_c_image_caption_dropout,
        lr=base.lr / 2,  # a fine-tuning of the text-trained prior
        seed=recipe.seed + 2,
    )
    parts = load_components(config)
    parts.image_encoder = CLIPVisionModelWithProjection.from_pretrained(encoder / "image_encoder").eval()
    parts.feature_extractor = CLIPImageProcessor.from_pretrained(encoder / "feature_extractor")
    assert parts.prior is not None, "the prior pipeline folder holds a prior"
    if parts.prior.config.clip_image_in_channels is None:  # a prior trained before the image steps
        parts.prior = with_image_mapper(parts.prior, parts.image_encoder.config.projection_dim)
    return config, parts


def with_image_mapper(prior: StableCascadeUNet, width: int) -> StableCascadeUNet:
    """``prior`` (without CLIP image conditioning) with a ``width``-input image mapper added, zero at
    first (a zero embedding then adds ``clip_seq`` zero tokens); its other weights as they were."""
    grown = StableCascadeUNet(prior.config.replace(clip_image_in_channels=width))
    missing, unexpected = grown.load_state_dict(prior.state_dict(), strict=False)
    assert not unexpected and all(key.startswith("clip_img_mapper.") for key in missing), missing
    torch.nn.init.zeros_(grown.clip_img_mapper.weight)
    torch.nn.init.zeros_(grown.clip_img_mapper.bias)
    return grown.to(prior.dtype)


def ip_adapter_config(recipe: Recipe, base: TrainConfig, prior: Path) -> TrainConfig:
    """The demo IP-Adapter on the final prior pipeline folder ``prior`` (frozen)."""
    return base.replace(
        task="ip-adapter",
        pretrained=prior,
        steps=recipe.ip_adapter_steps,
        batch_size=recipe.stage_c_batch_size,
        seed=recipe.seed + 3,
    )
