"""``generate``, ``img2img``, ``variation`` and ``reconstruct``: arguments → a request → saved images.

Every setting flag defaults to None, meaning "not given": the value then comes from ``--from-png``
(when given) or from the library's defaults (the preset's), so explicit flags override a PNG's
settings and nothing here duplicates a default of the library.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_cascade.cli import controls
from stable_cascade.cli.choices import (
    BUNDLES,
    DEFAULT_BUNDLE,
    DTYPES,
    MODEL_FLAGS,
    OFFLOADS,
    PRESETS,
    SAMPLERS,
)

if TYPE_CHECKING:  # the library loads when a command runs, not to parse arguments
    import PIL.Image

    from stable_cascade.engine import ImageRecord, Job

TASKS: dict[str, str] = {
    "generate": "txt2img",
    "img2img": "img2img",
    "variation": "variation",
    "reconstruct": "reconstruct",
}
#: Flag destination → Job.create argument(s) it sets.
_JOB_FLAGS: dict[str, tuple[str, ...]] = {
    "prompt": ("prompt",),
    "negative_prompt": ("negative_prompt",),
    "width": ("width",),
    "height": ("height",),
    "seed": ("seed",),
    "preset": ("preset",),
    "prior_steps": ("prior_steps",),
    "prior_guidance": ("prior_guidance",),
    "shift": ("prior_shift",),
    "decoder_steps": ("decoder_steps",),
    "decoder_guidance": ("decoder_guidance",),
    "sampler": ("prior_sampler", "decoder_sampler"),
    "strength": ("strength",),
    "batch_size": ("batch_size",),
    "count": ("count",),
}


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    """The four generation subcommands, on the subparsers ``commands``."""
    described = {
        "generate": "text → image through Stage C, Stage B and Stage A",
        "img2img": "image + text → image: Stage C starts from the image's EfficientNet latent",
        "variation": "variations of an image: its CLIP image embedding prompts Stage C",
        "reconstruct": "image → EfficientNet latent → Stage B → Stage A: what the cascade keeps of it",
    }
    for command, description in described.items():
        parser = commands.add_parser(command, parents=[common], help=description, description=description)
        prior = command != "reconstruct"
        if command != "generate":
            parser.add_argument("image", metavar="IMAGE", help="the input image")
        parser.add_argument(
            "prompt", metavar="PROMPT", nargs="?", help="the text prompt" + ("" if prior else " for Stage B")
        )
        parser.add_argument("--negative-prompt", help="what to avoid (default: none)")
        if command == "img2img":
            parser.add_argument(
                "--strength",
                type=float,
                help="how much of the image to replace: 0 keeps it, 1 ignores it (0.8)",
            )
        _model_options(parser, prior)
        if prior:
            controls.add_options(parser)
        _sampling_options(parser, prior)
        _run_options(parser, prior)
        parser.set_defaults(handler=run)


def _model_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("models")
    names = ", ".join(f"{name} ({description})" for name, description in BUNDLES.items())
    group.add_argument("--model", help=f"a named model: {names}; default {DEFAULT_BUNDLE}")
    spec = "a Hub repo id, a diffusers pipeline or model folder, or a single file / ComfyUI bundle"
    if prior:
        group.add_argument("--prior", help=f"Stage C: {spec}")
    group.add_argument("--decoder", help=f"Stage B: {spec}")
    group.add_argument("--stage-a", help="Stage A (VQGAN) single file")
    group.add_argument("--effnet", help="EfficientNet encoder single file (img2img, reconstruct)")
    if prior:
        group.add_argument("--previewer", help="Stage C previewer single file (--preview)")
        group.add_argument(
            "--lora",
            action="append",
            type=lora_spec,
            metavar="FILE[:SCALE]",
            help="a Stage C LoRA (ours, kohya/OneTrainer or Stability's format) at SCALE (1.0); repeatable",
        )
    group.add_argument(
        "--components", help="repo id or folder with the tokenizer and CLIP encoders for single files"
    )


def _sampling_options(parser: argparse.ArgumentParser, prior: bool, batch: bool = False) -> None:
    """The sampling flags; ``batch``: as ``batch`` means ``--seed`` and ``--count``."""
    group = parser.add_argument_group("sampling (default: the preset's values)")
    group.add_argument("--width", type=int, help="image width, a multiple of 8 (1024; --model demo: 128)")
    group.add_argument("--height", type=int, help="image height, a multiple of 8 (1024; --model demo: 128)")
    seed = "base seed: item i gets seed + 100000·i (the one OUT stores, else random)"
    group.add_argument(
        "--seed", type=int, help=seed if batch else "seed of the first image; image i gets seed + i (random)"
    )
    group.add_argument("--preset", choices=PRESETS, help="sampler settings of both stages (reference)")
    group.add_argument("--sampler", choices=SAMPLERS, help="sampler of both stages (ddpm)")
    if prior:
        group.add_argument("--prior-steps", type=int, help="Stage C steps (20)")
        group.add_argument("--prior-guidance", type=float, help="Stage C guidance scale (4.0)")
        group.add_argument("--shift", type=float, help="Stage C logSNR shift (reference preset: 2.0)")
    group.add_argument("--decoder-steps", type=int, help="Stage B steps (10)")
    group.add_argument(
        "--decoder-guidance", type=float, help="Stage B guidance scale (reference preset: 1.1)"
    )
    group.add_argument("--batch-size", type=int, help="images per batch (1)")
    group.add_argument("--count", type=int, help="images per item (1)" if batch else "number of batches (1)")


def _run_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("running and output")
    group.add_argument("--dtype", choices=DTYPES, help="auto: bf16 on CUDA with bf16 support, else fp32")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    group.add_argument("--offload", choices=OFFLOADS, default="none", help="CPU offload")
    group.add_argument(
        "-o",
        "--output",
        default="outputs/",
        help="a .png file (one image), a folder (numbered files; default outputs/) or a pattern with "
        "{seed}, {index} and {prompt}, e.g. 'out/{prompt}-{seed}.png'",
    )
    if prior:
        group.add_argument(
            "--preview", action="store_true", help="write Stage C previews as <name>.preview.png"
        )
    group.add_argument("--overwrite", action="store_true", help="replace existing output files")
    group.add_argument(
        "--from-png", metavar="FILE", help="rerun the settings stored in an image; other flags override them"
    )


def run(args: argparse.Namespace) -> int:
    from stable_cascade.cli.output import output_paths, preview_path, save_image
    from stable_cascade.engine import Engine, Finished, ImageDone, Preview, read_png, save_png

    task = TASKS[args.command]
    recorded = read_png(args.from_png) if args.from_png else None
    image = _input_image(args, task, recorded)
    job = _job(args, task, recorded, image)
    protected = [p for p in (args.from_png, getattr(args, "image", None)) if p]
    previews = getattr(args, "preview", False)
    paths = output_paths(
        args.output, job.seeds, job.prompt, overwrite=args.overwrite, protected=protected, previews=previews
    )
    engine = Engine(device=args.device, offload=args.offload, progress_bars=True)
    if recorded is not None:
        _announce_models(recorded, args.from_png)
    for folder in {path.parent for path in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    for lora in job.loras:
        print(f"LoRA {Path(lora.path).stem}: {lora.path} at scale {lora.scale:g}")
    more = f" (images get {job.seeds[0]} … {job.seeds[-1]})" if job.images > 1 else ""
    print(f"seed {job.seed}{more}")
    for event in engine.run(job, image, previews=previews):
        if isinstance(event, Preview):
            save_image(event.image, preview_path(paths[event.index]))
        elif isinstance(event, ImageDone):
            save_png(event.image, paths[event.index], event.record)
            print(f"saved {paths[event.index]}")
            if recorded is not None and event.index == 0:
                _compare_models(recorded, event.record)
        elif isinstance(event, Finished):
            stages = f"Stage B+A {event.decoder_seconds:.1f} s"
            if task != "reconstruct":
                stages = f"Stage C {event.prior_seconds:.1f} s, {stages}"
            print(f"{stages} for {len(paths)} image(s); loading {event.load_seconds:.1f} s")
    return 0


def lora_spec(text: str) -> tuple[Path, float]:
    """``FILE`` or ``FILE:SCALE`` (a file whose name holds a colon may be given whole) → (path, scale)."""
    path, scale = text, "1"
    if not Path(text).is_file() and ":" in text:
        path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected FILE or FILE:SCALE with a number SCALE, got {text!r}"
        ) from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"the scale of {text!r} must be a finite number")
    if not Path(path).is_file():
        raise argparse.ArgumentTypeError(f"LoRA file {path} does not exist")
    return Path(path), value


def _input_image(args: argparse.Namespace, task: str, recorded: ImageRecord | None) -> PIL.Image.Image | None:
    """The run's input image (None for txt2img); a record made from an image asks for it."""
    from stable_cascade.engine import image_sha256, open_image

    if task == "txt2img":
        if recorded is not None and recorded.job.task != "txt2img":
            made = recorded.job.task
            source = f" from {recorded.job.input_image}" if recorded.job.input_image else ""
            raise ValueError(
                f"{args.from_png} was made by {made}{source}; give the input image: "
                f"stable-cascade {made} IMAGE --from-png {args.from_png}"
            )
        return None
    image = open_image(args.image)
    wanted = recorded.job.input_image_sha256 if recorded is not None else None
    if wanted is not None and wanted != image_sha256(image):
        print(
            f"warning: {args.image} differs from the input image recorded in {args.from_png}", file=sys.stderr
        )
    return image


def _job(
    args: argparse.Namespace, task: str, recorded: ImageRecord | None, image: PIL.Image.Image | None
) -> Job:
    """The run's job: the recorded settings (or the defaults) with the given flags."""
    from stable_cascade.engine import Job, LoraRef, ModelSources, image_sha256

    values: dict[str, Any] = {}
    sources, dtype = ModelSources(), "auto"
    loras: list[LoraRef | tuple[str, float]] = []
    if recorded is not None:
        old = recorded.job
        values = {
            "prompt": old.prompt,
            "negative_prompt": old.negative_prompt,
            "width": old.width,
            "height": old.height,
            "seed": recorded.seed,
            "preset": old.preset,
            "strength": old.strength if task == old.task else None,
        }
        for name, stage in (("prior", old.prior), ("decoder", old.decoder)):
            if stage is not None:
                values.update({f"{name}_{key}": value for key, value in stage.__dict__.items()})
        sources, loras, dtype = old.models, list(old.loras), old.dtype
        for lora in old.loras:
            if not Path(lora.path).is_file() and not getattr(args, "lora", None):
                raise ValueError(
                    f"the LoRA {lora.path} recorded in {args.from_png} does not exist; put it back, or pass "
                    "--lora FILE[:SCALE] to use another"
                )
    elif task in ("txt2img", "img2img") and args.prompt is None:
        raise ValueError(f"{args.command} needs a PROMPT (or --from-png with an image made by this tool)")
    values.update(
        {
            field: value
            for flag, fields in _JOB_FLAGS.items()
            if (value := getattr(args, flag, None)) is not None
            for field in fields
        }
    )
    given = {flag: value for flag in MODEL_FLAGS if (value := getattr(args, flag, None)) is not None}
    if getattr(args, "lora", None):
        loras = [(str(path), scale) for path, scale in args.lora]
    if image is not None:
        values.update(
            input_image=Path(args.image).name, input_image_sha256=image_sha256(image), image_size=image.size
        )
    recorded_controls = recorded.job.controls if recorded is not None and task != "reconstruct" else ()
    job = Job.create(
        task=task,
        models=ModelSources(**{**sources.__dict__, **given}),
        loras=loras,
        dtype=args.dtype or dtype,
        controls=controls.from_flags(args, recorded_controls),
        **values,
    )
    controls.compare(recorded_controls, job.controls, args.from_png)
    return job


def _announce_models(recorded: ImageRecord, path: str) -> None:
    """One line naming the recorded models when they are not the default ones."""
    models = {k: v for k, v in recorded.job.models.__dict__.items() if v is not None}
    if models != {"model": DEFAULT_BUNDLE} or recorded.job.loras:
        named = ", ".join(f"{k}={v}" for k, v in models.items())
        named += "".join(f", lora={lora.path}:{lora.scale:g}" for lora in recorded.job.loras)
        print(f"models recorded in {path}: {named}")


def _compare_models(recorded: ImageRecord, made: ImageRecord) -> None:
    for role, digest in recorded.model_sha256.items():
        if made.model_sha256.get(role, digest) != digest:
            print(
                f"warning: the {role} model differs from the one recorded (sha256 {digest[:12]}…)",
                file=sys.stderr,
            )
