"""``batch``: the images of every prompt of a file, into one folder, resumable; one process or many.

stable-cascade batch prompts.txt -o out/ --model demo --batch-size 8
torchrun --nproc_per_node 4 -m stable_cascade batch prompts.jsonl -o out/
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from stable_cascade.cli.choices import OFFLOADS
from stable_cascade.cli.options import add_field_options, add_sampler_option, given_fields, typed
from stable_cascade.fields import BY_NAME, FIELDS, LIST_KINDS

#: Per-item fields (a PROMPTS file gives them) and run-wide ones that mean something else here.
_NOT_OPTIONS = ("prompt", "input_image", "seed", "batch_size")


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
    add_field_options(parser, None, skip=_NOT_OPTIONS, helps={"count": "images per item (default: 1)"})
    add_sampler_option(parser)
    group = parser.add_argument_group("running and output")
    seed = "base seed: item i gets seed + 100000·i (default: the one OUT stores, else random)"
    group.add_argument("--seed", type=typed(BY_NAME["seed"], BY_NAME["seed"].parse), help=seed)
    batch_size = BY_NAME["batch_size"]
    group.add_argument(
        "--batch-size", type=typed(batch_size, batch_size.parse), help="images per model call (1)"
    )
    group.add_argument(
        "-o", "--output", required=True, metavar="OUT", help="the folder of images (made if needed)"
    )
    group.add_argument(
        "--device", default="auto", help="auto (cuda:LOCAL_RANK if available, else cpu), cpu, cuda:N"
    )
    group.add_argument("--offload", choices=OFFLOADS, default="none", help="CPU offload")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from stable_cascade.batch import generate_batch

    settings: dict[str, Any] = given_fields(args)
    for name in _NOT_OPTIONS:
        settings.pop(name, None)
    for name in (field.name for field in FIELDS if field.kind in LIST_KINDS):
        if name in settings:
            settings[name] = [(str(path), scale) for path, scale in settings[name]]
    summary = generate_batch(
        args.prompts,
        args.output,
        settings=settings,
        seed=args.seed,
        batch_size=1 if args.batch_size is None else args.batch_size,
        device=args.device,
        offload=args.offload,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") == "0":  # one line per run, not per process
        print(summary.line())
    return 0
