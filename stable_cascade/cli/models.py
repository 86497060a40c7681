"""``convert`` and ``inspect``: model files in and out of the diffusers layout, and what a file is."""

from __future__ import annotations

import argparse
from typing import Any


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    convert = commands.add_parser(
        "convert",
        parents=[common],
        help="a single model file ↔ a diffusers model folder",
        description="Convert one component (Stage C, Stage B, Stage A, EfficientNet encoder, previewer, "
        "Stage C ControlNet): "
        "an original single file (or one in diffusers keys) → a diffusers model folder, or a diffusers "
        "model folder → an original single .safetensors file.",
    )
    convert.add_argument("source", metavar="SRC", help="a .safetensors file or a diffusers model folder")
    convert.add_argument("destination", metavar="DST", help="a model folder, or a .safetensors file")
    convert.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="cast the weights (default: keep)")
    convert.add_argument("--force", action="store_true", help="overwrite an existing DST")
    convert.add_argument(
        "--controlnet-blocks",
        type=int,
        nargs="+",
        metavar="K",
        help="a ControlNet file's target ResBlock calls, one per projection (default: the released "
        "0 4 8 12 51 55 59 63)",
    )
    convert.set_defaults(handler=run_convert)

    inspect = commands.add_parser(
        "inspect",
        parents=[common],
        help="what a checkpoint file or folder is",
        description="Describe a checkpoint file (stage, variant, dtype, parameters, layout; the parts of a "
        "ComfyUI bundle), a diffusers model folder or a pipeline folder (its components), from the "
        "safetensors headers alone; or the released models (--released).",
    )
    inspect.add_argument("paths", metavar="PATH", nargs="*", help="files or folders")
    inspect.add_argument(
        "--released", action="store_true", help="list the released models (built on meta: no download)"
    )
    inspect.set_defaults(handler=run_inspect)


def run_convert(args: argparse.Namespace) -> int:
    from stable_cascade.loading.conversion import convert_checkpoint

    done = convert_checkpoint(
        args.source,
        args.destination,
        dtype=args.dtype,
        overwrite=args.force,
        proj_blocks=args.controlnet_blocks,
    )
    dtype = str(done.dtype).removeprefix("torch.")
    print(f"wrote {done.destination}: {done.kind.value}, {dtype}, {done.parameters:,} parameters")
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    from stable_cascade.loading.inspection import inspect_path, released_models

    if args.released == bool(args.paths):
        raise ValueError("inspect takes PATHs or --released (one of them)")
    for path in args.paths:
        print("\n".join(inspect_path(path).lines()))
    if args.paths:
        return 0
    print(f"{'model':<14}{'stage':<10}{'parameters':>16}  latent for 1024x1024")
    for model in released_models():
        print(f"{model.name:<14}{model.stage:<10}{model.parameters:>16,}  {model.latent}")
    return 0
