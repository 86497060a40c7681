"""``demo train`` and ``demo evaluate``: retrain the shipped demo cascade, score prompt adherence."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

from stable_cascade.demo.settings import LCM_FOLDER, PREVIEWER_FILE, Recipe


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``demo`` command and its subcommands, on the subparsers ``commands``."""
    demo = commands.add_parser(
        "demo",
        help="the demo cascade shipped with the package: retrain it, score it",
        description="The demo cascade (used by --model demo) is a small Stage A, B and C with their "
        "encoders, trained with this package on synthetic shapes.",
    )
    subcommands = demo.add_subparsers(dest="demo_command", metavar="SUBCOMMAND", required=True)
    train = subcommands.add_parser(
        "train",
        parents=[common],
        help="retrain the demo cascade from scratch",
        description="Render the shapes data set and train Stage A, Stage B (with the EfficientNet and "
        "text encoders), Stage C and the previewer, in that order, then distil an LCM LoRA of each stage; "
        "writes OUT_DIR/model/{prior,decoder}, OUT_DIR/model/previewer.safetensors and "
        "OUT_DIR/model/lcm/{prior,decoder}.safetensors.",
    )
    train.add_argument("out_dir", metavar="OUT_DIR", help="where data, checkpoints and the model go")
    defaults = Recipe()
    for field in dataclasses.fields(Recipe):
        value, flag = getattr(defaults, field.name), f"--{field.name.replace('_', '-')}"
        if isinstance(value, bool):  # --flag / --no-flag
            train.add_argument(flag, action=argparse.BooleanOptionalAction, default=value, help=f"({value})")
        else:
            train.add_argument(flag, type=type(value), default=value, help=f"({value})")
    train.add_argument("--install", action="store_true", help="copy the result over the shipped demo model")
    train.add_argument(
        "--lcm-only",
        action="store_true",
        help="only distil the LCM LoRAs of the shipped demo cascade (minutes), into OUT_DIR/model/lcm",
    )
    train.set_defaults(handler=run_train)

    evaluate = subcommands.add_parser(
        "evaluate",
        parents=[common],
        help="generate the held-out prompts and score the images",
        description="Generate every held-out prompt (combinations never seen in training) with the demo "
        "cascade and score colours, shapes and positions with the shapes evaluator.",
    )
    evaluate.add_argument("model", nargs="?", help="a trained model folder (default: the shipped one)")
    evaluate.add_argument("--limit", type=int, help="only the first N prompts of each kind")
    evaluate.add_argument("--save", metavar="DIR", help="also save the images with their captions")
    evaluate.add_argument("--seed", type=int, default=0, help="(0)")
    evaluate.add_argument(
        "--preset",
        choices=("reference", "diffusers"),
        default="reference",
        help="sampler settings (reference)",
    )
    evaluate.add_argument(
        "--grid", metavar="FILE", help="also save a grid of the first 8 images of each kind"
    )
    evaluate.add_argument("--json", action="store_true", help="print the scores as JSON")
    evaluate.set_defaults(handler=run_evaluate)


def run_train(args: argparse.Namespace) -> int:
    from stable_cascade.demo.recipe import train_demo
    from stable_cascade.loading.bundles import DEMO_DIR

    recipe = Recipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe)})
    if args.lcm_only:
        from stable_cascade.demo.recipe import train_demo_lcm

        lcm = train_demo_lcm(Path(args.out_dir), recipe)
        print(f"LCM LoRAs written to {lcm}")
        if args.install:
            _install(lcm.parent, (LCM_FOLDER,), DEMO_DIR)
            print(f"installed into {DEMO_DIR / LCM_FOLDER}")
        return 0
    model = train_demo(Path(args.out_dir), recipe)
    print(f"demo cascade written to {model}")
    if args.install:
        from stable_cascade.engine import atomic

        _install(model, ("prior", "decoder", LCM_FOLDER), DEMO_DIR)
        (DEMO_DIR / PREVIEWER_FILE).unlink(missing_ok=True)
        for name in ("training.json", PREVIEWER_FILE):
            if (model / name).is_file():
                with atomic.atomic_path(DEMO_DIR / name) as temporary:
                    shutil.copy2(model / name, temporary)
        print(f"installed into {DEMO_DIR}")
    return 0


def _install(source: Path, names: tuple[str, ...], target: Path) -> None:
    """Copy the folders ``names`` of ``source`` over those of ``target``, each atomically (a folder the
    run did not make is removed)."""
    from stable_cascade.engine import atomic

    for name in names:
        if not (source / name).is_dir():
            shutil.rmtree(target / name, ignore_errors=True)
            continue
        with atomic.atomic_folder(target / name, replace=True) as folder:
            shutil.copytree(source / name, folder, dirs_exist_ok=True)


def run_evaluate(args: argparse.Namespace) -> int:
    from stable_cascade.demo.recipe import evaluate_demo

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be at least 1, got {args.limit}")
    model = Path(args.model) if args.model else None
    save = Path(args.save) if args.save else None
    grid = Path(args.grid) if args.grid else None
    scores = evaluate_demo(
        model, limit=args.limit, preset=args.preset, seed=args.seed, save_to=save, grid=grid
    )
    if args.json:
        print(json.dumps({kind: score.summary() for kind, score in scores.items()}, indent=2))
    else:
        for kind, score in scores.items():
            print(f"{kind}-object prompts: {score}")
    return 0
