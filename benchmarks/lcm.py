"""LCM on the demo cascade: held-out accuracy, time per image and UNet evaluations at 1, 2, 4 and 8 steps.

    python benchmarks/lcm.py                      # every held-out prompt (84 single, 466 two-object)
    python benchmarks/lcm.py --limit 32 --json    # a quick look

Rows: the teacher's ``reference`` preset (Stage C 20 steps with CFG 4, Stage B 10 steps with CFG 1.1:
the shipped model as the README scores it), then the ``lcm`` preset with k + k steps, with the demo's
LCM LoRAs (fused into the weights, so a step costs what a step of the base model costs) and, for
comparison, the ``lcm`` sampler on the teacher without them. Accuracy is the shapes evaluator's share of
attributes right (``stable-cascade demo evaluate``), batches of 16, seeds as there. Time per image:
sampling only (text encoding, both stages and Stage A's decode; models loaded), one image per call,
the median of ``--timed`` prompts after one warm-up. UNet evaluations: the rows both UNets ran per
image (a guided step counts two).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import harness  # noqa: F401  (puts this checkout first on sys.path)
import torch

from stable_cascade.demo import load_demo
from stable_cascade.demo.settings import DEMO_SIZE, LCM_FOLDER
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.pipelines.combined import StableCascadeCombinedPipeline
from stable_cascade.shapes import Score, held_out_prompts, score_by_kind

STEPS = (1, 2, 4, 8)


def settings(name: str, steps: int) -> dict[str, Any]:
    if name == "reference":
        return {"preset": "reference"}
    return {"preset": "lcm", "prior_num_inference_steps": steps, "num_inference_steps": steps}


@contextmanager
def counted(pipe: StableCascadeCombinedPipeline) -> Iterator[list[int]]:
    """The rows every UNet call of the block runs, in a list."""
    rows: list[int] = []
    hooks = [
        unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
        for unet in (pipe.prior_pipe.prior, pipe.decoder)
    ]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()


def accuracy(
    pipe: StableCascadeCombinedPipeline, options: dict[str, Any], limit: int | None
) -> dict[str, Any]:
    """Attributes right per kind of held-out prompt, and over all of them; UNet rows per image."""
    found: dict[str, Any] = {}
    overall, images = Score(), 0
    with counted(pipe) as rows:
        for kind in ("single", "double"):
            prompts = held_out_prompts(kind)[:limit]  # type: ignore[arg-type]
            made = []
            for i in range(0, len(prompts), 16):
                generator = torch.Generator().manual_seed(i)
                out = pipe(
                    prompts[i : i + 16], height=DEMO_SIZE, width=DEMO_SIZE, generator=generator, **options
                )
                made += out.images  # type: ignore[union-attr]
            score = score_by_kind(made, prompts)["all"]
            found[kind] = round(score.attributes, 4)
            overall, images = overall + score, images + len(prompts)
    found["all"] = round(overall.attributes, 4)
    found["unet_rows_per_image"] = sum(rows) / images
    return found


def seconds_per_image(pipe: StableCascadeCombinedPipeline, options: dict[str, Any], count: int) -> float:
    prompts = held_out_prompts("single")[: count + 1]
    times = []
    for i, prompt in enumerate(prompts):
        start = time.perf_counter()
        pipe(prompt, height=DEMO_SIZE, width=DEMO_SIZE, generator=torch.Generator().manual_seed(i), **options)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def run(limit: int | None, timed: int) -> list[dict[str, Any]]:
    pipe = load_demo()
    pipe.set_progress_bar_config(disable=True)
    rows = []

    def measure(name: str, steps: int, distilled: bool) -> None:
        options = settings(name, steps)
        row = {"setting": name, "steps": steps, "lcm_loras": distilled}
        row.update(accuracy(pipe, options, limit), seconds_per_image=seconds_per_image(pipe, options, timed))
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure("reference", 0, False)
    for steps in STEPS:
        measure("lcm", steps, False)
    pipe.prior_pipe.load_lora_weights(DEMO_DIR / LCM_FOLDER / "prior.safetensors", "lcm")
    pipe.decoder_pipe.load_lora_weights(DEMO_DIR / LCM_FOLDER / "decoder.safetensors", "lcm")
    pipe.prior_pipe.fuse_lora()
    pipe.decoder_pipe.fuse_lora()
    for steps in STEPS:
        measure("lcm", steps, True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    teacher = rows[0]
    lines = [
        "| sampling | LCM LoRAs | UNet evals / image | single | two-object | all | s / image | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        speed = teacher["seconds_per_image"] / row["seconds_per_image"]
        name = (
            "reference (20 + 10, CFG)"
            if row["setting"] == "reference"
            else f"lcm {row['steps']} + {row['steps']}"
        )
        lines.append(
            f"| {name} | {'yes' if row['lcm_loras'] else 'no'} | {row['unet_rows_per_image']:g} | "
            f"{100 * row['single']:.1f} % | {100 * row['double']:.1f} % | {100 * row['all']:.1f} % | "
            f"{row['seconds_per_image']:.3f} | {speed:.1f}× |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--limit", type=int, help="only the first N prompts of each kind")
    parser.add_argument("--timed", type=int, default=8, help="images timed one by one (8)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = run(args.limit, args.timed)
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
