"""How the demo cascade is made: data, the three stages in order, the shipped folders, the score.

1. Render the shapes dataset (training combinations only; :mod:`stable_cascade.shapes`).
2. Stage A (a small VQ autoencoder) learns to reconstruct the images; its latent scale is measured.
3. Stage B learns to denoise Stage A latents; the EfficientNet encoder learns with it. The noise is
   mostly plain Gaussian, as the sampler's (pyramid noise only at the 2×2 and 1×1 levels: enough
   that the background cannot be read off a noisy latent), and the encoder always sees the image at
   ¾ of its size, the 3×3 latent Stage C makes.
4. Stage C learns to generate the (now frozen) EfficientNet latents from text, read by a fresh,
   frozen text encoder (a small CLIP text tower with a word-level tokenizer,
   :mod:`stable_cascade.demo.tokenizer`). Random, it keeps every word apart; trained jointly with
   Stage C it merged the words Stage C had not yet learned to use ("left"/"right", "circle"/"square"),
   and Stage C never learned positions. Its CLIP image embeddings are zeros in this phase.
5. The image encoder (a small CLIP vision tower) learns contrastively against that text encoder, and
   Stage C learns image prompts: image embeddings for a share of the examples, zeros for the others
   (:mod:`stable_cascade.demo.images`).
6. Stage B is refined on the final encoders (the pipelines hand it Stage C's text embeddings).
7. The previewer learns to draw the image, at 8× the size of the (final) EfficientNet latent, from
   that latent: 24×24 previews of Stage C's 3×3 latents (``--preview``).
8. An IP-Adapter learns on the final, frozen prior, on a data set where the text leaves something to
   the image (variations, recolourings; :mod:`stable_cascade.shapes.prompts`).
9. An LCM LoRA per stage is distilled from the final Stage C and Stage B (``stable-cascade train lcm``),
   for ``--preset lcm``; :func:`train_demo_lcm` does this step alone on a finished model.
The prior (with its image encoder) and decoder pipelines are saved as two folders, as ``--model demo``
loads them, the previewer as one file beside them, ``previewer.safetensors``, as the released model
ships it, the IP-Adapter as ``ip_adapter.safetensors`` and the LCM LoRAs as ``lcm/prior.safetensors``
and ``lcm/decoder.safetensors`` (float16).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

from stable_cascade.checkpoint import read_json_object
from stable_cascade.checkpoint.atomic import atomic_folder, atomic_path, write_text
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.demo.configs import train_config
from stable_cascade.demo.images import (
    image_encoder_step,
    image_prompt_data,
    ip_adapter_config,
    stage_c_image_run,
)
from stable_cascade.demo.lcm import distil_lcm, timer, train_demo_lcm
from stable_cascade.demo.pipeline import DemoCascadePipeline
from stable_cascade.demo.settings import DEMO_SIZE, IP_ADAPTER_FILE, LCM_FOLDER, PREVIEWER_FILE, Recipe
from stable_cascade.engine.models import load_models
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.loading.sources import ModelSources
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.pipelines.combined import StableCascadeCombinedPipeline
from stable_cascade.shapes import Score, all_scenes, caption, held_out_prompts, score_by_kind, write_dataset
from stable_cascade.specs import EFFNET_VARIANTS
from stable_cascade.training import Components, TrainConfig, fresh_model
from stable_cascade.training.components import load_text_encoder
from stable_cascade.training.data import find_examples
from stable_cascade.training.trainees import encode_latents

logger = logging.getLogger(__name__)

TEXT_WIDTH = 128
MAX_TOKENS = 32


def text_encoder_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=TEXT_WIDTH,
        intermediate_size=4 * TEXT_WIDTH,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=TEXT_WIDTH,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def fresh_text_encoder(folder: Path, seed: int) -> Path:
    """A new text encoder and a tokenizer that spells every word of the shapes grammar as one token,
    saved as ``folder/{tokenizer,text_encoder}``."""
    from stable_cascade.demo.tokenizer import write_tokenizer

    vocab = write_tokenizer(
        folder / "tokenizer", (caption(scene) for scene in all_scenes(1)), max_length=MAX_TOKENS
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModelWithProjection(text_encoder_config(len(vocab)))
    encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    CLIPTokenizer.from_pretrained(folder / "tokenizer").save_pretrained(folder / "tokenizer")
    return folder


@torch.no_grad()
def calibrate_stage_a(folder: Path, data: Path, count: int = 256) -> float:
    """Set Stage A's ``scale_factor`` to the standard deviation of its latents on the training images,
    so that Stage B diffuses unit-variance latents (the released Stage A's 0.3764 plays this role)."""
    model = PaellaVQModel.from_pretrained(folder).eval()
    images = [example.image.read().convert("RGB") for example in find_examples(data)[:count]]
    std = float(encode_latents(model, prepare_images(images, DEMO_SIZE, DEMO_SIZE)).std())
    config = read_json_object(folder / "config.json")
    config["scale_factor"] = round(std, 4)
    write_text(folder / "config.json", json.dumps(config, indent=2))
    return std


def stage_c_run(recipe: Recipe, data: Path, decoder: Path, out: Path) -> tuple[TrainConfig, Components]:
    """Stage C on the EfficientNet encoder Stage B trained, with a fresh text encoder (frozen unless
    ``recipe.stage_c_train_text_encoder``)."""
    tokenizer, text_encoder = load_text_encoder(fresh_text_encoder(out / "text_c", recipe.seed + 1))
    parts = Components(
        prior=fresh_model("stage-c", "demo_prior", recipe.seed),  # type: ignore[arg-type]
        effnet=EfficientNetEncoder.from_pretrained(decoder, subfolder="effnet"),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
    )
    config = train_config(
        recipe,
        "stage-c",
        data,
        out / "stage_c",
        steps=recipe.stage_c_steps,
        batch_size=recipe.stage_c_batch_size,
        train_text_encoder=recipe.stage_c_train_text_encoder,
    )
    return config, parts


def stage_c_config(recipe: Recipe, data: Path, out: Path, **changes: Any) -> TrainConfig:
    """Stage C's settings in the recipe (its own batch size) with ``changes``."""
    return train_config(recipe, "stage-c", data, out, batch_size=recipe.stage_c_batch_size, **changes)


def refine_config(recipe: Recipe, data: Path, decoder: Path, prior: Path, out: Path) -> TrainConfig:
    """Stage B, second phase, on the encoders the cascade ships (the pipelines hand Stage C's text
    embeddings to Stage B), both frozen, at half the learning rate."""
    return stage_b_config(
        recipe,
        data,
        out,
        pretrained=decoder,
        text_encoder=prior,
        steps=recipe.stage_b_refine_steps,
        lr=recipe.lr / 2,
        seed=recipe.seed + 1,
    )


def stage_b_config(recipe: Recipe, data: Path, out: Path, **changes: Any) -> TrainConfig:
    scale = (recipe.effnet_scale, recipe.effnet_scale)
    return train_config(
        recipe,
        "stage-b",
        data,
        out,
        pyramid_noise_max_side=recipe.pyramid_noise_max_side,
        effnet_scale=scale,
        **changes,
    )


def previewer_config(recipe: Recipe, data: Path, decoder: Path, out: Path) -> TrainConfig:
    """The previewer, fresh, on the EfficientNet encoder of the decoder pipeline ``decoder``."""
    return train_config(
        recipe,
        "previewer",
        data,
        out,
        pretrained=decoder,
        init_config="demo_previewer",
        steps=recipe.previewer_steps,
        loss_weighting="none",
    )


def train_demo(out: Path, recipe: Recipe | None = None) -> Path:
    """Train the demo cascade from scratch under ``out``; returns ``out/model`` (``prior/`` and
    ``decoder/`` pipeline folders, ``previewer.safetensors`` and ``ip_adapter.safetensors``, as in the
    package). Logs how long each stage took."""
    recipe = recipe or Recipe()
    out = Path(out)
    times: dict[str, float] = {}
    start = time.perf_counter()
    data = write_dataset(out / "data", recipe.images, size=DEMO_SIZE, seed=recipe.seed)
    times["data"] = time.perf_counter() - start

    timed = timer(times)
    stage_a = timed(
        "stage-a",
        train_config(
            recipe, "stage-a", data, out / "stage_a", init_config="demo_vqgan", steps=recipe.stage_a_steps
        ),
    )
    calibrate_stage_a(stage_a, data)
    tokenizer, text_encoder = load_text_encoder(fresh_text_encoder(out / "text", recipe.seed))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(recipe.seed)
        effnet = EfficientNetEncoder(EFFNET_VARIANTS["demo_effnet"])
    decoder_parts = Components(
        decoder=fresh_model("stage-b", "demo_decoder", recipe.seed),  # type: ignore[arg-type]
        stage_a=PaellaVQModel.from_pretrained(stage_a),
        effnet=effnet,
        tokenizer=tokenizer,
        text_encoder=text_encoder,  # frozen: Stage B needs little text; Stage C's replaces it below
    )
    first = stage_b_config(recipe, data, out / "stage_b", steps=recipe.stage_b_steps, train_effnet=True)
    decoder = timed("stage-b", first, decoder_parts)
    prior = timed("stage-c", *stage_c_run(recipe, data, decoder, out))
    if recipe.stage_c_image_steps:
        begin = time.perf_counter()
        encoder = image_encoder_step(recipe, data, out / "text_c", out / "image_encoder")
        times["image-encoder"] = time.perf_counter() - begin
        phase = stage_c_config(recipe, data, out / "stage_c_image")
        prior = timed("stage-c-image", *stage_c_image_run(recipe, phase, prior, encoder))
    if recipe.stage_b_refine_steps:
        decoder = timed("stage-b-refine", refine_config(recipe, data, decoder, prior, out / "stage_b_refine"))
    model = out / "model"
    for name, folder in (("prior", prior), ("decoder", decoder)):
        with atomic_folder(model / name, replace=True) as copy:
            shutil.copytree(folder, copy, dirs_exist_ok=True)
    (model / PREVIEWER_FILE).unlink(missing_ok=True)
    if recipe.previewer_steps:
        previewer = timed("previewer", previewer_config(recipe, data, decoder, out / "previewer"))
        with atomic_path(model / PREVIEWER_FILE) as temporary:
            shutil.copy2(previewer / "diffusion_pytorch_model.safetensors", temporary)
    (model / IP_ADAPTER_FILE).unlink(missing_ok=True)
    if recipe.ip_adapter_steps and recipe.stage_c_image_steps:
        begin = time.perf_counter()
        prompts = image_prompt_data(recipe, out / "image_data")
        times["image-data"] = time.perf_counter() - begin
        base = stage_c_config(recipe, prompts, out / "ip_adapter")
        adapter = timed("ip-adapter", ip_adapter_config(recipe, base, model / "prior"))
        with atomic_path(model / IP_ADAPTER_FILE) as temporary:
            shutil.copy2(adapter / IP_ADAPTER_FILE, temporary)
    shutil.rmtree(model / LCM_FOLDER, ignore_errors=True)
    if recipe.lcm_steps:
        distil_lcm(recipe, data, model, out, timed, model / LCM_FOLDER)
    times["total"] = time.perf_counter() - start
    summary = {"recipe": dataclasses.asdict(recipe), "seconds": times}
    write_text(model / "training.json", json.dumps(summary, indent=2))
    logger.info(
        "demo cascade written to %s (%s)", model, ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    return model


def load_demo(model: Path | None = None, dtype: torch.dtype = torch.float32) -> DemoCascadePipeline:
    """The demo cascade as a combined pipeline (128² images by default): the shipped one, or the
    folders a training run wrote (without a decoder: the shipped one); with the previewer (the prior
    pipeline's ``previewer``) if any."""
    if model is None:
        pipeline = load_models(ModelSources(model="demo"), torch_dtype=dtype, previewer=True).pipeline
    else:
        previewer = Path(model) / PREVIEWER_FILE
        decoder = Path(model) / "decoder"  # an --images-only run writes the prior alone: the shipped one
        sources = ModelSources(
            prior=str(Path(model) / "prior"),
            decoder=str(decoder if decoder.is_dir() else DEMO_DIR / "decoder"),
            previewer=str(previewer) if previewer.is_file() else None,
        )
        pipeline = load_models(sources, torch_dtype=dtype).pipeline
    assert isinstance(pipeline, StableCascadeCombinedPipeline)
    return DemoCascadePipeline(**pipeline.components)


@torch.no_grad()
def evaluate_demo(
    model: Path | None = None,
    *,
    kinds: tuple[str, ...] = ("single", "double"),
    limit: int | None = None,
    preset: str = "reference",
    steps: tuple[int, int] | None = None,
    batch_size: int = 16,
    seed: int = 0,
    save_to: Path | None = None,
    grid: Path | None = None,
    columns: int = 8,
) -> dict[str, Score]:
    """Generate every held-out prompt of ``kinds`` (the first ``limit`` of each) and score the images
    with the shapes evaluator; optionally save them (``save_to/<kind>/NNNN.png`` + ``.txt``).

    Sampling follows ``preset`` (the command line's default, ``reference``: Stage C 20 steps, cfg 4;
    Stage B 10 steps); ``steps`` overrides the two step counts. ``grid``: also save the first
    ``columns`` (evenly spaced) images of each kind, with their prompts, as one picture."""
    pipeline = load_demo(model)
    pipeline.set_progress_bar_config(disable=True)
    scores: dict[str, Score] = {}
    samples: dict[str, list[tuple[Any, str]]] = {}
    for kind in kinds:
        prompts = held_out_prompts(kind)[:limit]  # type: ignore[arg-type]
        images: list[Any] = []
        for i in range(0, len(prompts), batch_size):
            batch = prompts[i : i + batch_size]
            generator = torch.Generator().manual_seed(seed + i)
            output = pipeline(
                batch,
                height=DEMO_SIZE,
                width=DEMO_SIZE,
                prior_num_inference_steps=steps[0] if steps else None,
                num_inference_steps=steps[1] if steps else None,
                preset=preset,
                generator=generator,
            )
            images += output.images  # type: ignore[union-attr]
        if save_to is not None:
            folder = Path(save_to) / kind
            folder.mkdir(parents=True, exist_ok=True)
            for j, (image, prompt) in enumerate(zip(images, prompts, strict=True)):
                with atomic_path(folder / f"{j:04d}.png") as temporary:
                    image.save(temporary, format="PNG")
                write_text(folder / f"{j:04d}.txt", prompt)
        scores[kind] = score_by_kind(images, prompts)["all"]
        samples[kind] = list(zip(images, prompts, strict=True))
    if grid is not None:
        # Evenly spaced samples: the held-out prompts come grouped by combination.
        picked = sample_grid([row[:: max(1, len(row) // columns)][:columns] for row in samples.values()])
        with atomic_path(grid) as temporary:
            picked.save(temporary, format=PIL.Image.registered_extensions().get(grid.suffix.lower(), "PNG"))
    return scores


def sample_grid(rows: list[list[tuple[Any, str]]], side: int = DEMO_SIZE, caption_height: int = 44) -> Any:
    """One row of (image, prompt) per kind, each image above its prompt wrapped to the image's width."""
    from PIL import Image, ImageDraw

    columns = max(len(row) for row in rows)
    cell = side + caption_height
    grid = Image.new("RGB", (columns * side, len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for r, row in enumerate(rows):
        for c, (image, prompt) in enumerate(row):
            grid.paste(image.resize((side, side)), (c * side, r * cell))
            lines = textwrap.wrap(prompt, width=side // 6)
            draw.multiline_text((c * side + 3, r * cell + side + 2), "\n".join(lines[:4]), fill="black")
    return grid


__all__ = [
    "DEMO_DIR",
    "DEMO_SIZE",
    "PREVIEWER_FILE",
    "Recipe",
    "evaluate_demo",
    "load_demo",
    "sample_grid",
    "train_demo",
    "train_demo_lcm",
]
