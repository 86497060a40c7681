"""The demo cascade shipped with the package: it loads offline, generates what the prompt asks for,
and the documented command retrains it; its tokenizer keeps every word of the grammar whole."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import CLIPTokenizer

from stable_cascade.cli.main import build_parser, main
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.demo import DEMO_SIZE, Recipe, evaluate_demo, load_demo
from stable_cascade.demo.recipe import IP_ADAPTER_FILE, PREVIEWER_FILE
from stable_cascade.demo.refit import IMAGE_FIELDS
from stable_cascade.demo.settings import LCM_FOLDER
from stable_cascade.demo.tokenizer import words_of, write_tokenizer
from stable_cascade.loading.bundles import BUNDLES, DEMO_DIR
from stable_cascade.lora import read_lora_metadata
from stable_cascade.nn.previewer import Previewer
from stable_cascade.pipelines.previews import PreviewCallback
from stable_cascade.shapes import all_scenes, caption, held_out_prompts, score
from stable_cascade.specs import PREVIEWER_VARIANTS

SHIPPED = (DEMO_DIR / "prior" / "model_index.json").is_file() and (DEMO_DIR / "decoder").is_dir()


def test_the_shipped_demo_is_small_and_complete() -> None:
    assert SHIPPED, f"the demo cascade is missing from {DEMO_DIR}"
    size = sum(p.stat().st_size for p in DEMO_DIR.rglob("*") if p.is_file())
    assert size <= 50 * 2**20, f"the demo weights take {size / 2**20:.1f} MiB, over the 50 MiB budget"
    assert not [p for p in DEMO_DIR.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
    trained = json.loads((DEMO_DIR / "training.json").read_text())
    assert trained["seconds"]["total"] > 0
    assert BUNDLES["demo"].default_size == DEMO_SIZE
    previewer = DEMO_DIR / PREVIEWER_FILE
    assert previewer.is_file() and previewer.stat().st_size < 2**20, "the demo previewer is missing or big"
    assert trained["seconds"]["previewer"] > 0
    for stage in ("prior", "decoder"):  # the LCM LoRAs of --preset lcm
        lora = DEMO_DIR / LCM_FOLDER / f"{stage}.safetensors"
        assert lora.stat().st_size < 2**19, f"the demo's {stage} LCM LoRA is over 512 KiB"
        assert read_lora_metadata(lora) | {"stage": stage, "adapter": "lcm"} == read_lora_metadata(lora)
    distilled = json.loads((DEMO_DIR / LCM_FOLDER / "training.json").read_text())
    assert distilled["seconds"]["lcm-c"] > 0 and distilled["seconds"]["lcm-b"] > 0
    for part in ("image_encoder", "feature_extractor"):  # image prompts and variations
        assert (DEMO_DIR / "prior" / part).is_dir(), f"the demo prior has no {part}"
    assert trained["seconds"]["image-encoder"] > 0 and trained["seconds"]["stage-c-image"] > 0
    assert trained["seconds"]["ip-adapter"] > 0


@pytest.mark.slow
def test_demo_follows_held_out_single_object_prompts() -> None:
    """Prompts whose (shape, colour, position) never occurred in training, scored by the evaluator.
    The bounds: the issue's goal (80 % of attributes; the shipped model gets 92.5 %, README), far
    above an untrained cascade's (~0.05 attributes, ~0.1 backgrounds)."""
    scores = evaluate_demo(kinds=("single",), batch_size=84)  # all 84 held-out single prompts
    summary = scores["single"].summary()
    assert scores["single"].images == len(held_out_prompts("single"))
    assert summary["background"] >= 0.95 and summary["colour"] >= 0.8, summary
    assert summary["attributes"] >= 0.8, summary


@pytest.mark.slow
def test_the_readme_prompt_draws_what_it_asks_for() -> None:
    """The README's main command with the CLI's defaults (reference preset, 128²), seeds 0-15: every
    image has one blue object on the right, on black, and the evaluator sees a square in at least 14
    (the shipped model: all 16, and 61 of seeds 0-63; the model with 32,000 refinement steps: 10,
    the rest being squares with rounded corners the evaluator calls circles)."""
    prompt = "a blue square on the right, on a black background"
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    generators = [torch.Generator().manual_seed(seed) for seed in range(16)]
    images = pipe(
        [prompt] * 16, height=DEMO_SIZE, width=DEMO_SIZE, preset="reference", generator=generators
    ).images
    result = score(images, [prompt] * 16)
    assert (result.colour, result.position, result.background, result.count) == (16,) * 4, result
    assert result.shape >= 14, result


@pytest.mark.slow
def test_demo_generates_offline_from_the_command_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    prompt = "a blue square on the right, on a black background"
    out = tmp_path / "square.png"
    command = [sys.executable, "-m", "stable_cascade", "generate", prompt, "--model", "demo", "-o", str(out)]
    done = subprocess.run(
        [*command, "--prior-steps", "10", "--decoder-steps", "6", "--seed", "1", "--preview"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    from PIL import Image

    image = Image.open(out)
    assert image.size == (DEMO_SIZE, DEMO_SIZE)  # the demo's size unless --width/--height say otherwise
    result = score([image.convert("RGB")], [prompt])
    assert result.summary()["background"] == 1.0, result.summary()
    assert "not available offline" not in done.stderr  # the shipped previewer, not the fallback
    preview = Image.open(tmp_path / "square.preview.png").convert("RGB")
    assert preview.size == (24, 24)  # 8 × the 3×3 Stage C latent
    final = prepare_images([image.convert("RGB")], 24, 24)
    error, baseline = preview_errors(prepare_images([preview], 24, 24), final)
    assert float(error) < 0.7 * float(baseline), (error, baseline)  # measured: 0.51


def preview_errors(previews: torch.Tensor, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image: the mean absolute error of the preview to the image at the preview's size, and that
    of the image's mean colour (a preview that only knows the background)."""
    error = (previews - images).abs().mean(dim=(1, 2, 3))
    baseline = (images - images.mean(dim=(2, 3), keepdim=True)).abs().mean(dim=(1, 2, 3))
    return error, baseline


def test_shipped_previewer_previews_follow_the_image() -> None:
    """The last Stage C step's previews (the shipped previewer, loaded offline; the CLI's reference
    preset) against the final images at the preview's size, 24×24, on eight prompts and seeds: half
    the error of each image's mean colour overall (measured: 0.49), and each preview far closer to its
    own image than to the other seven (measured: at most 0.12 of that error). An untrained previewer
    fails both by far."""
    pipe = load_demo()
    assert isinstance(pipe.prior_pipe.previewer, Previewer)
    pipe.set_progress_bar_config(disable=True)
    prompts = [
        "a red circle on the left, on a white background",
        "a blue square on the right, on a black background",
        "a green triangle at the top, on a yellow background",
        "a yellow circle in the center, on a blue background",
        "a purple square at the bottom, on a white background",
        "a white triangle on the left, on a green background",
        "a red square at the top, on a black background",
        "a blue circle on the right, on a yellow background",
    ]
    previews = PreviewCallback()
    out = pipe(
        prompts,
        height=DEMO_SIZE,
        width=DEMO_SIZE,
        preset="reference",
        num_inference_steps=6,
        generator=[torch.Generator().manual_seed(seed) for seed in range(len(prompts))],
        prior_callback_on_step_end=previews,
        prior_callback_on_step_end_tensor_inputs=previews.tensor_inputs,
    )
    assert [image.size for image in previews.images[-1]] == [(24, 24)] * len(prompts)
    shown, final = prepare_images(previews.images[-1], 24, 24), prepare_images(out.images, 24, 24)
    error, baseline = preview_errors(shown, final)
    assert float(error.mean()) < 0.6 * float(baseline.mean()), (error, baseline)
    cross = (shown[:, None] - final[None]).abs().mean(dim=(2, 3, 4))  # [i, j]: preview i vs image j
    others = (cross.sum(dim=1) - cross.diagonal()) / (len(prompts) - 1)
    assert bool((error < 0.3 * others).all()), (error, others)


def test_the_demo_takes_image_embeddings_of_its_own_encoder() -> None:
    pipe = load_demo()
    width = pipe.prior_pipe.prior.config.clip_image_in_channels
    assert pipe.prior_pipe.image_encoder is not None and pipe.prior_pipe.feature_extractor is not None
    assert pipe.prior_pipe.image_encoder.config.projection_dim == width
    with pytest.raises(ValueError, match=f"must have {width} channels"):
        pipe.prior_pipe("a red circle on the left, on a white background", image_embeds=torch.zeros(1, 1, 3))


def test_tokenizer_spells_each_grammar_word_as_one_token(tmp_path: Path) -> None:
    captions = [caption(scene) for scene in all_scenes(2)[:2000]] + held_out_prompts("single")
    write_tokenizer(tmp_path, captions, max_length=32)
    tokenizer = CLIPTokenizer.from_pretrained(tmp_path)
    for word in words_of(captions):
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    longest = max(captions, key=len)
    assert len(tokenizer(longest).input_ids) <= 32
    assert tokenizer("zebra").input_ids[1:-1]  # words outside the vocabulary still tokenize


@pytest.mark.slow
def test_documented_retrain_command_builds_a_loadable_cascade(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``stable-cascade demo train`` end to end at a toy size (data, Stage A, B with its encoders, C,
    the two pipeline folders), then ``demo evaluate`` on what it wrote."""
    toy = (
        ["--images", "64"]
        + [arg for s in ("a", "b", "b-refine", "c", "c-image") for arg in (f"--stage-{s}-steps", "3")]
        + ["--previewer-steps", "3", "--image-encoder-steps", "3", "--ip-adapter-steps", "3"]
        + ["--stage-c-batch-size", "4", "--lcm-steps", "2"]
    )
    assert main(["demo", "train", str(tmp_path / "run"), *toy, "--batch-size", "4"]) == 0
    model = tmp_path / "run" / "model"
    files = {"prior", "decoder", "training.json", PREVIEWER_FILE, IP_ADAPTER_FILE, LCM_FOLDER}
    assert {p.name for p in model.iterdir()} >= files
    recorded = json.loads((model / "training.json").read_text())
    assert recorded["recipe"]["stage_b_refine_steps"] == 3 and set(recorded["seconds"]) >= {
        "stage-a",
        "stage-b",
        "stage-c",
        "image-encoder",
        "stage-c-image",
        "stage-b-refine",
        "previewer",
        "ip-adapter",
        "lcm-c",
        "lcm-b",
    }
    assert read_lora_metadata(model / LCM_FOLDER / "decoder.safetensors")["steps"] == "2"
    cascade = load_demo(model)
    assert cascade.prior_pipe.image_encoder is not None  # the run's image encoder, in its prior folder
    cascade.prior_pipe.load_ip_adapter(model / IP_ADAPTER_FILE)  # fits the run's prior
    previewer = load_demo(model).prior_pipe.previewer  # the run's previewer, not the shipped one
    assert previewer is not None and previewer.config == PREVIEWER_VARIANTS["demo_previewer"]
    trained = load_file(tmp_path / "run" / "previewer" / "final" / "diffusion_pytorch_model.safetensors")
    assert torch.equal(previewer.blocks[0].weight, trained["blocks.0.weight"])
    # Stage C's text encoder is the fresh one, untouched (the recipe keeps it frozen).
    fresh = load_file(tmp_path / "run" / "text_c" / "text_encoder" / "model.safetensors")
    shipped = load_file(model / "prior" / "text_encoder" / "model.safetensors")
    assert fresh.keys() == shipped.keys() and all(torch.equal(fresh[k], shipped[k]) for k in fresh)
    capsys.readouterr()
    assert main(["demo", "evaluate", str(model), "--limit", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["single"]["images"] == 2 and printed["double"]["images"] == 2
    assert main(["demo", "evaluate", str(model), "--limit", "0"]) == 2


@pytest.mark.slow
def test_the_lcm_loras_alone_are_rebuilt_in_minutes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``demo train OUT --lcm-only``: step 7 on the shipped cascade (here 2 steps per stage); the LoRAs
    load into the demo pipeline and sample with the lcm preset."""
    toy = ["--images", "32", "--lcm-steps", "2", "--batch-size", "4", "--stage-c-batch-size", "4"]
    assert main(["demo", "train", str(tmp_path / "run"), "--lcm-only", *toy]) == 0
    folder = tmp_path / "run" / "model" / LCM_FOLDER
    assert f"LCM LoRAs written to {folder}" in capsys.readouterr().out
    assert {p.name for p in folder.iterdir()} == {"prior.safetensors", "decoder.safetensors", "training.json"}
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    pipe.prior_pipe.load_lora_weights(folder / "prior.safetensors")
    pipe.decoder_pipe.load_lora_weights(folder / "decoder.safetensors")
    assert pipe("a red circle", preset="lcm").images[0].size == (DEMO_SIZE, DEMO_SIZE)


def test_retrain_command_takes_every_recipe_field() -> None:
    parser = build_parser()
    args = parser.parse_args(["demo", "train", "out", "--stage-c-steps", "7", "--effnet-scale", "0.5"])
    assert (args.stage_c_steps, args.effnet_scale, args.stage_c_train_text_encoder) == (7, 0.5, False)
    args = parser.parse_args(["demo", "train", "out", "--stage-c-train-text-encoder"])
    assert args.stage_c_train_text_encoder is True
    assert {f.name for f in dataclasses.fields(Recipe)} <= set(vars(args))


def test_recipe_defaults_are_the_shipped_ones() -> None:
    """The image steps' fields are recorded once the shipped demo is retrained with them (``demo train
    --images-only --install``); the other fields made it."""
    recorded, defaults = json.loads((DEMO_DIR / "training.json").read_text())["recipe"], Recipe().__dict__
    assert recorded == {name: value for name, value in defaults.items() if name in recorded}
    assert all(name.startswith(IMAGE_FIELDS) for name in set(defaults) - set(recorded))


def test_load_demo_makes_images_at_the_native_size_and_warns_on_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    steps = {"prior_num_inference_steps": 1, "num_inference_steps": 1, "preset": "reference"}
    assert pipe("a red circle on the left, on a black background", **steps).images[0].size == (DEMO_SIZE,) * 2
    assert "trained at" not in caplog.text
    assert pipe("a red circle", width=256, height=128, **steps).images[0].size == (256, 128)
    assert "the demo cascade was trained at 128x128; at 256x128" in caplog.text
