"""Image prompts and the IP-Adapter on the demo cascade, measured on held-out shapes.

    python benchmarks/image_prompts_demo.py                      # every measurement, as JSON
    python benchmarks/image_prompts_demo.py --picture docs/image_prompts.png
    python benchmarks/image_prompts_demo.py --model OUT/model --singles 24 --doubles 24   # a quicker look

* variation: every held-out one-object scene (combinations never seen in training), rendered with
  jitter, is the only prompt (empty text); the share of outputs whose object keeps the input's
  colour, shape and position (the shapes evaluator), and the attribute share. Two-object scenes: the
  first ``--doubles`` held-out ones, the same way.
* text + image: the image of a held-out one-object scene with a text that names another colour (the
  scene's caption with the object's colour replaced by one that is neither it nor the background):
  the share of outputs with the text's colour and the image's shape. ``colour word``: the same with the
  colour word alone as the text.
* ip-adapter: both again with the demo IP-Adapter at scale 1 (which takes the image prompts over:
  the prior's own image tokens get zeros); at scale 0 the outputs must equal the prior's text-only
  ones bit for bit (checked on every text + image case).
* text only: ``evaluate_demo`` (every held-out prompt), as ``stable-cascade demo evaluate``.
* the decoder's share (``decoder_without_text``): Stage C prompted by each held-out caption, then Stage B
  given that caption or an empty text. A variation (or a colour word) leaves Stage B without the shape's
  name, so what Stage B draws from Stage C's 3×3 latent alone bounds every image-prompt result above.
  ``reconstruction``: the same bound with a perfect Stage C: the EfficientNet latent of each held-out
  render itself through Stage B and Stage A (``decoder_pipe.reconstruct``), with the caption or empty.
  ``latent_shape_probe``: how much of the shape that latent holds at all: classifiers (linear, and a
  256-unit MLP) trained to read the shape from the EfficientNet latents of the training one-object
  scenes (4 jittered renders each), scored on the held-out ones (chance: 1/3).

Sampling: the reference preset (Stage C 20 steps, cfg 4; Stage B 10 steps), seed ``i`` for case ``i``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import harness  # noqa: F401  (puts this checkout first on sys.path)
import numpy as np
import PIL.Image
import torch

from stable_cascade.checkpoint.atomic import atomic_path
from stable_cascade.conditioning import encode_images
from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.demo.recipe import DEMO_DIR, DEMO_SIZE, evaluate_demo, load_demo, sample_grid
from stable_cascade.demo.settings import IP_ADAPTER_FILE
from stable_cascade.shapes.dataset import SHAPES, Scene, caption, render, split
from stable_cascade.shapes.evaluate import detect, score_by_kind
from stable_cascade.shapes.prompts import recoloured

BATCH = 16


def held_out(objects: int, limit: int | None = None) -> list[Scene]:
    scenes = [s for s in split()[1] if len(s.objects) == objects]
    if limit is not None and limit < len(scenes):
        scenes = scenes[:: len(scenes) // limit][:limit]  # evenly spaced: they come grouped
    return scenes


def generate(pipe: Any, prompts: list[str], embeds: torch.Tensor) -> list[Any]:
    """One image per prompt, prompted by the image embedding of its row (reference preset)."""
    images: list[Any] = []
    for i in range(0, len(prompts), BATCH):
        out = pipe(
            prompts[i : i + BATCH],
            image_embeds=embeds[i : i + BATCH],
            height=DEMO_SIZE,
            width=DEMO_SIZE,
            preset="reference",
            generator=[torch.Generator().manual_seed(i + j) for j in range(len(prompts[i : i + BATCH]))],
        )
        images += out.images
    return images


def kept(images: list[Any], scenes: list[Scene]) -> dict[str, float]:
    """Share of images keeping every object's colour, shape and position; attribute share."""
    score = score_by_kind(images, [caption(s) for s in scenes])["all"]
    summary = score.summary()
    return {"kept": summary["whole_objects"], "attributes": summary["attributes"], "images": len(images)}


def mixed(images: list[Any], texts: list[Scene], shown: list[Scene]) -> dict[str, float]:
    """Share of images whose (largest) object has the text's colour and the image's shape."""
    right = 0
    for image, text, scene in zip(images, texts, shown, strict=True):
        found = detect(image)
        right += (
            bool(found)
            and found[0].colour == text.objects[0].colour
            and found[0].shape == scene.objects[0].shape
        )
    return {"text_colour_and_image_shape": right / len(images), "images": len(images)}


def measure(
    pipe: Any,
    adapter: Path,
    singles: list[Scene],
    pairs: list[Scene],
    examples: list[list[tuple[Any, str]]] | None,
) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    renders = [render(scene, DEMO_SIZE, rng) for scene in [*singles, *pairs]]
    prior = pipe.prior_pipe
    embeds = encode_images(prior.feature_extractor, prior.image_encoder, renders, "cpu", torch.float32)[0]
    embeds = embeds[:, None]  # (N, 1, C): one image per row
    single_embeds, pair_embeds = embeds[: len(singles)], embeds[len(singles) :]
    texts = [recoloured(scene, i) for i, scene in enumerate(singles)]
    results: dict[str, Any] = {}
    variation = generate(pipe, [""] * len(singles), single_embeds)
    results["variation"] = kept(variation, singles)
    results["variation_two_objects"] = kept(generate(pipe, [""] * len(pairs), pair_embeds), pairs)
    mix = generate(pipe, [caption(t) for t in texts], single_embeds)
    results["text_and_image"] = mixed(mix, texts, singles)
    words = generate(pipe, [t.objects[0].colour for t in texts], single_embeds)
    results["text_and_image_colour_word"] = mixed(words, texts, singles)
    text_only = generate_text(pipe, [caption(t) for t in texts])
    prior.load_ip_adapter(adapter, scale=0.0, adapter_name="demo")
    off = generate(pipe, [caption(t) for t in texts], single_embeds)
    results["ip_adapter_scale_0_equals_text_only"] = all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(off, text_only, strict=True)
    )
    prior.set_ip_adapter_scale(1.0)
    results["ip_adapter_variation"] = kept(generate(pipe, [""] * len(singles), single_embeds), singles)
    ip_mix = generate(pipe, [caption(t) for t in texts], single_embeds)
    results["ip_adapter_text_and_image"] = mixed(ip_mix, texts, singles)
    if examples is not None:
        prior.set_ip_adapter_scale(0.5)
        half = generate(pipe, [caption(t) for t in texts[:8]], single_embeds[:8])
        for k in range(8):
            examples.append([
                (renders[k], "input image"),
                (variation[k], "variation"),
                (mix[k], f"text: {texts[k].objects[0].colour} + image"),
                (off[k], "IP-Adapter 0"),
                (half[k], "IP-Adapter 0.5"),
                (ip_mix[k], "IP-Adapter 1"),
            ])  # fmt: skip
    prior.unload_ip_adapter("demo")
    results["decoder_without_text"] = decoder_without_text(pipe, singles)
    results["reconstruction"] = reconstruction(pipe, renders[: len(singles)], singles)
    results["latent_shape_probe"] = latent_shape_probe(pipe.prior_pipe.effnet)
    return results


def reconstruction(pipe: Any, renders: list[Any], scenes: list[Scene]) -> dict[str, Any]:
    """Objects kept when each render's own EfficientNet latent is decoded with its caption or nothing."""
    captions = [caption(scene) for scene in scenes]
    out: dict[str, Any] = {}
    for name, texts in (("caption", captions), ("empty", [""] * len(scenes))):
        images: list[Any] = []
        for i in range(0, len(scenes), BATCH):
            images += pipe.decoder_pipe.reconstruct(
                renders[i : i + BATCH],
                prompt=texts[i : i + BATCH],
                preset="reference",
                generator=[torch.Generator().manual_seed(j) for j in range(i, min(i + BATCH, len(scenes)))],
            ).images
        out[f"stage_b_{name}"] = score_by_kind(images, captions)["all"].summary()
    return out


def latent_shape_probe(effnet: Any, epochs: int = 500) -> dict[str, float]:
    """Held-out accuracy of shape classifiers on EfficientNet latents (see the module's docstring)."""
    scenes = split()
    train = [s for s in scenes[0] if len(s.objects) == 1]
    test = [s for s in scenes[1] if len(s.objects) == 1]

    def latents(chosen: list[Scene], seed: int) -> torch.Tensor:
        rng = np.random.default_rng(seed)
        pixels = prepare_images([render(scene, DEMO_SIZE, rng) for scene in chosen], DEMO_SIZE, DEMO_SIZE)
        return effnet.encode(prepare_images(pixels, *effnet_input_size(DEMO_SIZE, DEMO_SIZE))).flatten(1)

    def labels(chosen: list[Scene]) -> torch.Tensor:
        return torch.tensor([SHAPES.index(scene.objects[0].shape) for scene in chosen])

    x_train = torch.cat([latents(train, seed) for seed in range(4)])
    y_train = labels(train).repeat(4)
    x_test, y_test = latents(test, 9), labels(test)
    mean, std = x_train.mean(0), x_train.std(0) + 1e-6
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    results = {}
    for name, hidden in (("linear", 0), ("mlp", 256)):
        torch.manual_seed(0)
        width = x_train.shape[1]
        model = (
            torch.nn.Linear(width, 3)
            if not hidden
            else torch.nn.Sequential(
                torch.nn.Linear(width, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 3)
            )
        )
        optimizer = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-4)
        with torch.enable_grad():
            for _ in range(epochs):
                loss = torch.nn.functional.cross_entropy(model(x_train), y_train)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        with torch.no_grad():
            results[f"{name}_train"] = float((model(x_train).argmax(1) == y_train).float().mean())
            results[f"{name}_held_out"] = float((model(x_test).argmax(1) == y_test).float().mean())
    return results


def decoder_without_text(pipe: Any, scenes: list[Scene]) -> dict[str, Any]:
    """Objects kept when Stage C reads each scene's caption and Stage B reads it too, or nothing."""
    captions = [caption(scene) for scene in scenes]
    out: dict[str, Any] = {}
    for i in range(0, len(scenes), BATCH):
        seeds = range(i, min(i + BATCH, len(scenes)))
        latents = pipe.prior_pipe(
            captions[i : i + BATCH],
            height=DEMO_SIZE,
            width=DEMO_SIZE,
            num_inference_steps=None,
            guidance_scale=None,
            preset="reference",
            generator=[torch.Generator().manual_seed(j) for j in seeds],
        ).image_embeddings
        for name, texts in (("caption", captions[i : i + BATCH]), ("empty", [""] * len(seeds))):
            images = pipe.decoder_pipe(
                image_embeddings=latents,
                prompt=texts,
                num_inference_steps=None,
                guidance_scale=None,
                preset="reference",
                generator=[torch.Generator().manual_seed(j) for j in seeds],
            ).images
            out.setdefault(name, []).extend(images)
    return {
        f"stage_b_{name}": score_by_kind(images, captions)["all"].summary() for name, images in out.items()
    }


def generate_text(pipe: Any, prompts: list[str]) -> list[Any]:
    """The prior's text-only images (its image tokens zero), seeds as :func:`generate`'s."""
    zeros = torch.zeros(len(prompts), 1, pipe.prior_pipe.prior.config.clip_image_in_channels)
    return generate(pipe, prompts, zeros)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--doubles", type=int, default=96, help="two-object held-out scenes for variation")
    parser.add_argument("--picture", type=Path, help="also save a grid of examples (the README's)")
    parser.add_argument("--no-text-only", action="store_true", help="skip the text-only evaluation")
    parser.add_argument(
        "--model", type=Path, help="a demo model folder (prior/, decoder/, ip_adapter.safetensors)"
    )
    parser.add_argument(
        "--singles", type=int, help="only this many one-object scenes, evenly spaced (all 84)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    pipe = load_demo(args.model)
    pipe.set_progress_bar_config(disable=True)
    adapter = (args.model or DEMO_DIR) / IP_ADAPTER_FILE
    examples: list[list[tuple[Any, str]]] | None = [] if args.picture else None
    with torch.no_grad():
        results = measure(pipe, adapter, held_out(1, args.singles), held_out(2, args.doubles), examples)
    if not args.no_text_only:
        scores = evaluate_demo(args.model, limit=args.singles)
        results["text_only"] = {kind: s.summary()["attributes"] for kind, s in scores.items()}
    results["seconds"] = round(time.perf_counter() - start)
    if args.picture is not None and examples:
        with atomic_path(args.picture) as temporary:
            picture = sample_grid(examples, caption_height=20)
            picture.save(
                temporary, format=PIL.Image.registered_extensions().get(args.picture.suffix.lower(), "PNG")
            )
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
