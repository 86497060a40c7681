"""The demo cascade's image prompts: its image encoder retrieves held-out scenes' captions, ``variation
--model demo`` keeps the input's colour, shape and position, a text names the colour of an image's
shape, and the shipped IP-Adapter fits the shipped prior (at scale 0: the prior's text-only images)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from stable_cascade.demo import DEMO_SIZE, load_demo
from stable_cascade.demo.image_encoder import retrieval_accuracy
from stable_cascade.demo.settings import IP_ADAPTER_FILE
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.lora.ip_adapter import load_ip_adapter
from stable_cascade.nn.ip_adapter import check_fits
from stable_cascade.shapes import Scene, caption, render, score, split
from stable_cascade.training.components import load_text_encoder

#: Image → text retrieval among the held-out one-object captions (84 scenes, chance 1.2 %); the
#: shipped encoder: 84 of 84 (and 91.4 % among the 466 two-object captions).
RETRIEVAL = 0.85


def held_out_singles() -> list[Scene]:
    return [scene for scene in split()[1] if len(scene.objects) == 1]


def test_the_demo_image_encoder_retrieves_held_out_captions() -> None:
    encoder = CLIPVisionModelWithProjection.from_pretrained(DEMO_DIR / "prior" / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(DEMO_DIR / "prior" / "feature_extractor")
    tokenizer, text_encoder = load_text_encoder(DEMO_DIR / "prior")
    with torch.no_grad():
        accuracy = retrieval_accuracy(encoder, processor, tokenizer, text_encoder, held_out_singles())
    assert accuracy >= RETRIEVAL, accuracy


def test_the_demo_image_encoder_tells_each_attribute_apart() -> None:
    """Each held-out render's embedding is nearest its own caption among the captions that differ from
    it in the shape alone (the colour alone, the position alone): the embedding holds the shape, so the
    demo's weak variations are not the encoder's doing (see benchmarks/RESULTS.md). Shipped: 84 of 84
    for each attribute."""
    import dataclasses

    from stable_cascade.conditioning.text import embed_tokens, tokenize
    from stable_cascade.shapes.dataset import COLOURS, POSITIONS, SHAPES

    encoder = CLIPVisionModelWithProjection.from_pretrained(DEMO_DIR / "prior" / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(DEMO_DIR / "prior" / "feature_extractor")
    tokenizer, text_encoder = load_text_encoder(DEMO_DIR / "prior")
    scenes = held_out_singles()
    rng = np.random.default_rng(0)
    pixels = processor([render(scene, DEMO_SIZE, rng) for scene in scenes], return_tensors="pt").pixel_values
    with torch.no_grad():
        images = torch.nn.functional.normalize(encoder(pixels).image_embeds, dim=-1)
        for attribute, values in (("shape", SHAPES), ("colour", COLOURS), ("position", POSITIONS)):
            right = 0
            for image, scene in zip(images, scenes, strict=True):
                (obj,) = scene.objects
                others = [v for v in values if not (attribute == "colour" and v == scene.background)]
                options = [dataclasses.replace(obj, **{attribute: v}) for v in others]
                ids, mask = tokenize(tokenizer, [caption(Scene((o,), scene.background)) for o in options])
                texts = torch.nn.functional.normalize(
                    embed_tokens(text_encoder, ids, mask).pooled[:, 0], dim=-1
                )
                right += options[int((texts @ image).argmax())] == obj
            assert right >= 0.95 * len(scenes), (attribute, right)


def test_the_shipped_ip_adapter_fits_the_demo_prior() -> None:
    adapter = load_ip_adapter(DEMO_DIR / IP_ADAPTER_FILE)
    prior = load_demo().prior_pipe.prior
    check_fits(adapter.config, prior, IP_ADAPTER_FILE)
    assert adapter.config.image_dim == prior.config.clip_image_in_channels
    assert (DEMO_DIR / IP_ADAPTER_FILE).stat().st_size < 2 * 2**20  # fp32: 1.8 MiB


@pytest.mark.slow
def test_variations_keep_position_and_often_colour_and_shape() -> None:
    """Eight held-out one-object scenes as the only prompt (empty text). The demo's image path is weak
    on shape and colour (see benchmarks/RESULTS.md: every object's position, about a third whole);
    measured here: position 8, colour 4, shape 6, whole 3 of 8. A prior that ignored the image would
    keep about 1 in 9 positions and one colour in six."""
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    scenes = held_out_singles()[::10][:8]
    rng = np.random.default_rng(1)
    inputs = [render(scene, DEMO_SIZE, rng) for scene in scenes]
    generators = [torch.Generator().manual_seed(seed) for seed in range(len(scenes))]
    images = []
    for picture, generator in zip(inputs, generators, strict=True):
        images += pipe("", images=[picture], preset="reference", generator=generator).images
    result = score(images, [caption(scene) for scene in scenes])
    assert result.position == 8 and result.colour >= 3 and result.shape >= 5 and result.whole >= 2, result


@pytest.mark.slow
def test_variation_command_works_on_the_demo(tmp_path: Path) -> None:
    scene = held_out_singles()[0]
    render(scene, DEMO_SIZE, np.random.default_rng(0)).save(tmp_path / "in.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "stable_cascade",
        "variation",
        str(tmp_path / "in.png"),
        "--model",
        "demo",
    ]
    command += ["-o", str(tmp_path / "out.png"), "--seed", "0"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = score([Image.open(tmp_path / "out.png").convert("RGB")], [caption(scene)])
    # its colour and place; not its shape (the red circle comes out another shape)
    assert result.colour == result.position == 1, result
