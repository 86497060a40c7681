"""LCM on the demo cascade: held-out accuracy, time per image and UNet evaluations at 1, 2, 4 and 8 steps.

    python benchmarks/lcm.py                      # every held-out prompt (84 single, 466 two-object)
    python benchmarks/lcm.py --limit 32 --json    # a quick look

Rows: the teacher's ``reference`` preset (Stage C 20 steps with CFG 4, Stage B 10 steps with CFG 1.1:
the shipped model as the README scores it), then the ``lcm`` preset with k + k steps, with the demo's
LCM LoRAs (fused into the weights, so a step costs what a step of the base model costs) and, for
comparison, the ``lcm`` sampler on the teacher without them. Accuracy is the shapes evaluator's share of
attributes right (``stable-cascade demo evaluate``), batches of 16, seeds as there. Time per image:
sampling only (text encoding, both stages and Stage A's decode; models loaded), one image per call,
the median of ``--timed`` prompts after one warm-up, the settings interleaved prompt by prompt; the fused
LoRAs change no step's cost, so the times of the ``lcm`` rows are taken once, without them (one more
time: 4 + 4 steps with the LoRAs unfused, as the command line runs them). UNet evaluations: the rows
both UNets ran per image (a guided step counts two).
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


def timings(
    configs: dict[str, tuple[StableCascadeCombinedPipeline, dict[str, Any]]], count: int
) -> dict[str, float]:
    """Seconds per image of each (pipeline, settings): one image per call, the configs interleaved
    prompt by prompt (a load on the machine hits them alike), the median of ``count`` after one warm-up
    round."""
    times: dict[str, list[float]] = {name: [] for name in configs}
    for i, prompt in enumerate(held_out_prompts("single")[: count + 1]):
        for name, (pipe, options) in configs.items():
            generator = torch.Generator().manual_seed(i)
            start = time.perf_counter()
            pipe(prompt, height=DEMO_SIZE, width=DEMO_SIZE, generator=generator, **options)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values[1:]) for name, values in times.items()}


def with_lcm_loras(pipe: StableCascadeCombinedPipeline) -> StableCascadeCombinedPipeline:
    pipe.prior_pipe.load_lora_weights(DEMO_DIR / LCM_FOLDER / "prior.safetensors", "lcm")
    pipe.decoder_pipe.load_lora_weights(DEMO_DIR / LCM_FOLDER / "decoder.safetensors", "lcm")
    return pipe


def run(limit: int | None, timed: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    plain, adapted = load_demo(), with_lcm_loras(load_demo())
    for pipe in (plain, adapted):
        pipe.set_progress_bar_config(disable=True)
    configs = {"reference": (plain, settings("reference", 0))}
    configs |= {f"lcm {k}": (plain, settings("lcm", k)) for k in STEPS}
    configs["lcm 4, LoRAs unfused"] = (adapted, settings("lcm", 4))  # as the command line runs them
    seconds = timings(configs, timed)  # fused LoRAs change no step's cost: the lcm rows' times
    adapted.prior_pipe.fuse_lora()
    adapted.decoder_pipe.fuse_lora()
    rows = []

    def measure(pipe: StableCascadeCombinedPipeline, name: str, steps: int) -> None:
        row = {"setting": name, "steps": steps, "lcm_loras": pipe is adapted}
        row.update(accuracy(pipe, settings(name, steps), limit))
        row["seconds_per_image"] = seconds["reference" if name == "reference" else f"lcm {steps}"]
        rows.append(row)
        print(json.dumps(row), flush=True)

    measure(plain, "reference", 0)
    for pipe in (plain, adapted):
        for steps in STEPS:
            measure(pipe, "lcm", steps)
    return rows, seconds


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
    rows, seconds = run(args.limit, args.timed)
    print(json.dumps({"rows": rows, "seconds": seconds}, indent=2) if args.json else table(rows))
    if not args.json:
        print("seconds per image:", json.dumps({k: round(v, 4) for k, v in seconds.items()}))


if __name__ == "__main__":
    main()
