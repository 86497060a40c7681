"""``stable-cascade demo train --images-only``: the image steps on the shipped demo cascade (toy sizes) give
a prior with an image encoder that makes variations, an IP-Adapter that fits it, and the prior's LCM
LoRA again; the shipped demo itself is left as it is. A short run of the image encoder alone retrieves
held-out captions far above chance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

from stable_cascade.cli.main import main
from stable_cascade.demo import DEMO_SIZE, load_demo
from stable_cascade.demo.image_encoder import EncoderTraining, retrieval_accuracy, train_image_encoder
from stable_cascade.demo.settings import IP_ADAPTER_FILE, LCM_FOLDER
from stable_cascade.engine import Engine, ImageDone, Job, image_sha256
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.lora import read_lora_metadata
from stable_cascade.shapes import render, split, write_dataset
from stable_cascade.training.components import load_text_encoder

#: Image → text retrieval of a short encoder run (below); chance is 1.2 %.
RETRIEVAL = 0.4


@pytest.mark.slow
def test_images_only_retrain_makes_variations_and_an_ip_adapter(tmp_path: Path) -> None:
    shipped = {p: p.stat().st_mtime_ns for p in DEMO_DIR.rglob("*") if p.is_file()}
    toy = ["--images", "64", "--batch-size", "4", "--stage-c-batch-size", "4", "--lcm-steps", "2"]
    toy += ["--image-encoder-steps", "3", "--stage-c-image-steps", "3", "--ip-adapter-steps", "3"]
    assert main(["demo", "train", str(tmp_path / "run"), "--images-only", *toy]) == 0
    model = tmp_path / "run" / "model"
    recorded = json.loads((model / "training.json").read_text())
    assert recorded["recipe"]["stage_c_image_steps"] == 3 and recorded["recipe"]["stage_c_steps"] == 6000
    assert {"image-data", "image-encoder", "stage-c-image", "ip-adapter", "lcm-c"} <= set(recorded["seconds"])
    prompts = (tmp_path / "run" / "image_data" / "metadata.jsonl").read_text()
    assert prompts.count('"image_prompt"') > 0 and prompts.count("\n") == 64  # the IP-Adapter's data:
    state = json.loads((tmp_path / "run" / "ip_adapter" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["config"]["data"] == str(tmp_path / "run" / "image_data"), state["config"]
    assert read_lora_metadata(model / LCM_FOLDER / "prior.safetensors")["steps"] == "2"
    assert (model / LCM_FOLDER / "decoder.safetensors").read_bytes() == (
        DEMO_DIR / LCM_FOLDER / "decoder.safetensors"
    ).read_bytes()  # Stage B's LCM LoRA: the shipped one
    assert not (model / "decoder").exists()  # only the prior is new: Stage B stays the shipped one
    prior = load_demo(model).prior_pipe  # with the shipped decoder
    assert prior.image_encoder is not None  # and the shipped prior, text-only, gained an image mapper:
    assert prior.prior.config.clip_image_in_channels == prior.image_encoder.config.projection_dim
    scene = next(s for s in split()[1] if len(s.objects) == 1)
    picture = render(scene, DEMO_SIZE, np.random.default_rng(0))
    job = Job.create(
        task="variation",
        input_image="in.png",
        input_image_sha256=image_sha256(picture),
        model="demo",
        prior=str(model / "prior"),
        prior_steps=2,
        decoder_steps=2,
        seed=1,
        width=DEMO_SIZE,
        height=DEMO_SIZE,
        ip_adapters=[(model / IP_ADAPTER_FILE, 0.5)],
    )
    (done,) = [e for e in Engine(device="cpu").run(job, picture) if isinstance(e, ImageDone)]
    assert done.image.size == (DEMO_SIZE, DEMO_SIZE) and done.record.job.ip_adapters == job.ip_adapters
    assert shipped == {p: p.stat().st_mtime_ns for p in DEMO_DIR.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_a_short_image_encoder_run_retrieves_held_out_captions(tmp_path: Path) -> None:
    """200 contrastive steps against the shipped demo's text encoder on 2,000 images: image → text
    retrieval among the 84 held-out one-object captions (chance 1.2 %) measured 59.5 %."""
    data = write_dataset(tmp_path / "data", 2_000, size=DEMO_SIZE, seed=0)
    tokenizer, text_encoder = load_text_encoder(DEMO_DIR / "prior")
    run = EncoderTraining(steps=200, batch_size=64, images=2_000)
    out = train_image_encoder(data, tokenizer, text_encoder, tmp_path / "encoder", run)
    encoder = CLIPVisionModelWithProjection.from_pretrained(out / "image_encoder")
    processor = CLIPImageProcessor.from_pretrained(out / "feature_extractor")
    singles = [scene for scene in split()[1] if len(scene.objects) == 1]
    with torch.no_grad():
        accuracy = retrieval_accuracy(encoder, processor, tokenizer, text_encoder, singles)
    assert accuracy >= RETRIEVAL, accuracy
