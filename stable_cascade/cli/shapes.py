"""``shapes make``, ``shapes prompts``, ``shapes score``: the synthetic shapes data set and its evaluator."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``shapes`` command and its subcommands, on the subparsers ``commands``."""
    shapes = commands.add_parser(
        "shapes",
        help="synthetic shapes data: make a data set, list held-out prompts, score images",
        description="Captioned images of one or two coloured shapes (circle, square, triangle) on a plain "
        "background, with a held-out set of combinations, and an automatic evaluator of prompt adherence.",
    )
    subcommands = shapes.add_subparsers(dest="shapes_command", metavar="SUBCOMMAND", required=True)

    make = subcommands.add_parser(
        "make",
        parents=[common],
        help="write a data set: NNNNNN.png + NNNNNN.txt pairs and metadata.jsonl",
        description="Render captioned scenes into a new folder: NNNNNN.png with its caption in NNNNNN.txt, "
        "and a metadata.jsonl manifest. Scenes come from the training split or the held-out one.",
    )
    make.add_argument("out_dir", metavar="OUT_DIR", help="a new (or empty) folder")
    make.add_argument("--count", type=int, default=1000, help="how many images (1000)")
    make.add_argument("--size", type=int, default=128, help="image side in pixels (128)")
    make.add_argument("--seed", type=int, default=0, help="picks the scenes and their jitter (0)")
    make.add_argument("--split", choices=("train", "held-out"), default="train", help="(train)")
    make.add_argument(
        "--two-object-fraction", type=float, default=0.5, help="share of two-object scenes (0.5)"
    )
    make.set_defaults(handler=run_make)

    prompts = subcommands.add_parser(
        "prompts",
        parents=[common],
        help="print the held-out prompts, one per line",
        description="Print the captions of the held-out scenes (never in training), one per line.",
    )
    prompts.add_argument("--kind", choices=("single", "double"), default="single", help="objects (single)")
    prompts.set_defaults(handler=run_prompts)

    score = subcommands.add_parser(
        "score",
        parents=[common],
        help="score images against their captions",
        description="Detect the objects in each image of a folder (x.png with its caption in x.txt) and "
        "report the fraction of colours, shapes, positions and backgrounds that match the caption.",
    )
    score.add_argument("image_dir", metavar="IMAGE_DIR", help="a folder of x.png + x.txt pairs")
    score.add_argument("--json", action="store_true", help="print the scores as JSON")
    score.set_defaults(handler=run_score)


def run_make(args: argparse.Namespace) -> int:
    from stable_cascade.shapes.dataset import write_dataset

    out = write_dataset(
        args.out_dir,
        args.count,
        size=args.size,
        seed=args.seed,
        two_object_fraction=args.two_object_fraction,
        split=args.split,
    )
    print(f"wrote {args.count} {args.split} images and their captions to {out}")
    return 0


def run_prompts(args: argparse.Namespace) -> int:
    from stable_cascade.shapes.dataset import held_out_prompts

    print("\n".join(held_out_prompts(args.kind)))
    return 0


def run_score(args: argparse.Namespace) -> int:
    from stable_cascade.shapes.evaluate import score_folder

    scores = score_folder(args.image_dir)
    if args.json:
        print(json.dumps({kind: s.summary() for kind, s in scores.items()}, indent=2))
        return 0
    for kind, s in scores.items():
        print(f"{kind}: {s}")
    return 0
