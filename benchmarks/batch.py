"""Batch generation throughput: images/s of ``stable-cascade batch`` on the demo model, one process
against several (``torchrun --standalone``), on the same items.

    python benchmarks/batch.py --items 32 --processes 1 2 --batch-size 4

Each configuration runs the command into a fresh folder and reads its ``summary.json``: images/s over
the generation (after the models loaded) and the wall time of the whole command (start-up included).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = ("circle", "square", "triangle", "star")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white", "black")


def run(prompts: Path, out: Path, processes: int, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, "-m", "stable_cascade"]
    if processes > 1:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            str(processes),
        ]
        command += ["-m", "stable_cascade"]
    command += ["batch", str(prompts), "-o", str(out), "--model", "demo", "--seed", "0", "--no-progress"]
    command += ["--batch-size", str(args.batch_size)]
    if args.prior_steps:
        command += ["--prior-steps", str(args.prior_steps)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("OMP_NUM_THREADS", None)  # each process takes its share of the cores
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - start
    summary = json.loads((out / "summary.json").read_text())
    return {"images_per_second": summary["images_per_second"], "wall": wall, "images": summary["generated"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--prior-steps", type=int, help="Stage C steps (the preset's 20)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        lines = [
            f"a {COLOURS[i % len(COLOURS)]} {SHAPES[i // len(COLOURS) % len(SHAPES)]}"
            for i in range(args.items)
        ]
        prompts.write_text("\n".join(lines) + "\n")
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
            f"{args.items} items, 128x128"
        )
        for number, processes in enumerate(args.processes):
            result = run(prompts, Path(folder) / f"out-{number}", processes, args)
            print(
                f"{processes} process(es): {result['images']} images, "
                f"{result['images_per_second']:.2f} images/s generating, "
                f"{result['wall']:.1f} s wall (start-up and loading included)"
            )


if __name__ == "__main__":
    main()
