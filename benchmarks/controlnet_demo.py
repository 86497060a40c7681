"""Train a canny ControlNet for the demo prior on the shapes data and measure that it moves objects.

    python benchmarks/controlnet_demo.py train OUT --steps 1500      # CPU, one thread
    python benchmarks/controlnet_demo.py evaluate OUT/final          # prints the two rates

Evaluation: for every held-out one-object prompt whose position is left, right, top or bottom, the
control image is the same object at the mirrored position (canny edges of its render). "follows
control" counts images whose detected object sits at the control's position; "follows prompt
(no control)" is the demo cascade alone on the same prompts, seeds and sampler (the prior is frozen,
so this is exactly the shipped model's adherence).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from pathlib import Path

import harness  # noqa: F401  (puts this checkout first on sys.path)
import torch

from stable_cascade.conditioning.control import canny_edges
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.demo import load_demo
from stable_cascade.demo.recipe import DEMO_DIR, DEMO_SIZE, sample_grid
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.pipelines.outputs import postprocess
from stable_cascade.shapes.dataset import (
    POSITIONS,
    Scene,
    Shape,
    caption,
    held_out_prompts,
    parse_caption,
    render,
    write_dataset,
)
from stable_cascade.shapes.evaluate import detect
from stable_cascade.training import TrainConfig, train

MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def train_controlnet(out: Path, steps: int, images: int, batch_size: int, lr: float) -> Path:
    data = write_dataset(out / "data", images, size=DEMO_SIZE, seed=1, two_object_fraction=0.0)
    misplace_captions(data, share=0.5)
    config = TrainConfig(
        task="controlnet",
        data=data,
        output_dir=out / "run",
        pretrained=DEMO_DIR / "prior",
        resolution=DEMO_SIZE,
        batch_size=batch_size,
        steps=steps,
        lr=lr,
        ema_decay=0.0,
        checkpoint_every=steps,
        log_every=100,
        controlnet_type="canny",
    )
    start = time.perf_counter()
    final = train(config)
    print(json.dumps({"trained": str(final), "seconds": round(time.perf_counter() - start)}))
    return final


def misplace_captions(data: Path, share: float, seed: int = 0) -> None:
    """Give ``share`` of the captions another object position than the image's, so that the
    ControlNet learns what this demo measures: the control image wins over the prompt's position."""
    rng = random.Random(seed)
    lines = []
    for line in (data / "metadata.jsonl").read_text().splitlines():
        entry = json.loads(line)
        scene = parse_caption(entry["text"])
        obj = scene.objects[0]
        if rng.random() < share:
            other = rng.choice([p for p in POSITIONS if p != obj.position])
            entry["text"] = caption(Scene((Shape(obj.shape, obj.colour, other),), scene.background))
            (data / entry["file_name"]).with_suffix(".txt").write_text(entry["text"] + "\n")
        lines.append(json.dumps(entry))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def cases(limit: int | None) -> list[tuple[str, Scene, str]]:
    """(prompt, control scene, control position) for the held-out single prompts not in the center."""
    found = []
    for prompt in held_out_prompts("single"):
        scene = parse_caption(prompt)
        obj = scene.objects[0]
        if obj.position in MIRROR:
            moved = Shape(obj.shape, obj.colour, MIRROR[obj.position])  # type: ignore[arg-type]
            found.append((prompt, Scene((moved,), scene.background), moved.position))
    return found[:limit]


@torch.no_grad()
def evaluate(controlnet_dir: Path, limit: int | None, batch: int, picture: Path | None) -> dict[str, float]:
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    controlnet = ControlNet.from_pretrained(controlnet_dir)
    rows = cases(limit)
    follows_control = follows_prompt = 0
    examples = []
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        prompts = [p for p, _, _ in chunk]
        controls = [render(scene, DEMO_SIZE) for _, scene, _ in chunk]
        settings = {"height": DEMO_SIZE, "width": DEMO_SIZE, "preset": "reference"}
        pipe.prior_pipe.controlnet = None
        plain = pipe(prompts, generator=torch.Generator().manual_seed(i), **settings).images
        pipe.prior_pipe.controlnet = controlnet
        controlled = pipe(
            prompts, generator=torch.Generator().manual_seed(i), control_image=controls, **settings
        ).images
        for (prompt, _, target), image, plain_image, control in zip(
            chunk, controlled, plain, controls, strict=True
        ):
            found = detect(image)
            follows_control += bool(found) and found[0].position == target
            wanted = parse_caption(prompt).objects[0].position
            base = detect(plain_image)
            follows_prompt += bool(base) and base[0].position == wanted
            if len(examples) < 12:
                edges = postprocess(
                    canny_edges(prepare_images(control, DEMO_SIZE, DEMO_SIZE)).expand(-1, 3, -1, -1), "pil"
                )
                examples += [
                    (plain_image, prompt),
                    (edges[0], f"control: canny, {target}"),
                    (image, "with control"),
                ]
    if picture is not None:
        sample_grid([examples[j : j + 3] for j in range(0, len(examples), 3)]).save(picture)
    n = len(rows)
    return {
        "prompts": n,
        "follows_control": follows_control / n,
        "follows_prompt_no_control": follows_prompt / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    t.add_argument("out", type=Path)
    t.add_argument("--steps", type=int, default=1500)
    t.add_argument("--images", type=int, default=2000)
    t.add_argument("--batch-size", type=int, default=16)
    t.add_argument("--lr", type=float, default=1e-3)
    e = sub.add_parser("evaluate")
    e.add_argument("controlnet", type=Path)
    e.add_argument("--limit", type=int)
    e.add_argument("--batch", type=int, default=16)
    e.add_argument("--picture", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO)
    if args.command == "train":
        train_controlnet(args.out, args.steps, args.images, args.batch_size, args.lr)
    else:
        print(json.dumps(evaluate(args.controlnet, args.limit, args.batch, args.picture)))


if __name__ == "__main__":
    main()
