"""``batch``: the images of every prompt of a file, into one folder, resumable; one process or many.

stable-cascade batch prompts.txt -o out/ --model demo --batch-size 8
torchrun --nproc_per_node 4 -m stable_cascade batch prompts.jsonl -o out/
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from stable_cascade.cli.choices import DTYPES, MODEL_FLAGS, OFFLOADS
from stable_cascade.cli.generate import _JOB_FLAGS, _model_options, _sampling_options

#: The flags every item starts from (prompt and seed are per item; --batch-size sets the unit size).
_SETTING_FLAGS = {
    flag: fields for flag, fields in _JOB_FLAGS.items() if flag not in ("prompt", "seed", "batch_size")
}


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    description = (
        "Make the images of every item of PROMPTS into OUT: a .txt file (one prompt a line; blank lines and "
        "lines starting with # are skipped), a .jsonl file (one object a line: prompt and per-item overrides "
        "such as seed, negative_prompt, width, height, count, prior_steps, task and image) or a .csv file "
        "with a prompt column (and override columns). Rerunning skips the images made; under torchrun or "
        "accelerate launch the processes share the items."
    )
    parser = commands.add_parser(
        "batch",
        parents=[common],
        help="many prompts → a folder of images, resumable, multi-process",
        description=description,
    )
    parser.add_argument("prompts", metavar="PROMPTS", help="a .txt, .jsonl or .csv file of items")
    parser.add_argument("--negative-prompt", help="what to avoid, for items that give none (default: none)")
    parser.add_argument(
        "--strength", type=float, help="img2img items: how much of the image to replace (0.8)"
    )
    _model_options(parser, prior=True)
    _sampling_options(parser, prior=True, batch=True)
    group = parser.add_argument_group("running and output")
    group.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the folder of images (made if needed)"
    )
    group.add_argument("--dtype", choices=DTYPES, help="auto: bf16 on CUDA with bf16 support, else fp32")
    group.add_argument(
        "--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N"
    )
    group.add_argument("--offload", choices=OFFLOADS, default="none", help="CPU offload")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from stable_cascade.batch import generate_batch
    from stable_cascade.engine import ModelSources

    settings: dict[str, Any] = {
        field: value
        for flag, fields in _SETTING_FLAGS.items()
        if (value := getattr(args, flag, None)) is not None
        for field in fields
    }
    settings["models"] = ModelSources(**{flag: getattr(args, flag) for flag in MODEL_FLAGS})
    settings["loras"] = [(str(path), scale) for path, scale in args.lora or ()]
    if args.dtype:
        settings["dtype"] = args.dtype
    summary = generate_batch(
        args.prompts,
        args.output,
        settings=settings,
        seed=args.seed,
        batch_size=args.batch_size or 1,
        device=args.device,
        offload=args.offload,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(summary.line())
    return 0
