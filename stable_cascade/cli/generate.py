"""``generate``, ``img2img``, ``variation`` and ``reconstruct``: arguments → a request → saved images.

Every setting flag defaults to None, meaning "not given": the value then comes from ``--from-png``
(when given) or from the library's defaults (the preset's), so explicit flags override a PNG's
settings and nothing here duplicates a default of the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path
from typing import Any

from stable_cascade.cli.output import output_paths, preview_path
from stable_cascade.diffusion.samplers import SAMPLERS
from stable_cascade.loading.bundles import BUNDLES, DEFAULT_BUNDLE
from stable_cascade.pipelines.metadata import GenerationParameters, Task, read_png, save_png
from stable_cascade.pipelines.presets import PRESETS
from stable_cascade.pipelines.runner import InputImage, Request, Runner
from stable_cascade.pipelines.sources import (
    ModelSources,
    load_models,
    place,
    resolve_device,
    resolve_dtype,
)

TASKS: dict[str, Task] = {
    "generate": "txt2img",
    "img2img": "img2img",
    "variation": "variation",
    "reconstruct": "reconstruct",
}
DTYPES = ("auto", "bf16", "fp16", "fp32")
#: Flag destination → Request field(s) it sets.
_REQUEST_FLAGS: dict[str, tuple[str, ...]] = {
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
_MODEL_FLAGS = tuple(f.name for f in dataclasses.fields(ModelSources))


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
        _sampling_options(parser, prior)
        _run_options(parser, prior)
        parser.set_defaults(handler=run)


def _model_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("models")
    names = ", ".join(f"{name} ({bundle.description})" for name, bundle in BUNDLES.items())
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


def _sampling_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("sampling (default: the preset's values)")
    group.add_argument("--width", type=int, help="image width, a multiple of 8 (1024; --model demo: 128)")
    group.add_argument("--height", type=int, help="image height, a multiple of 8 (1024; --model demo: 128)")
    group.add_argument("--seed", type=int, help="seed of the first image; image i gets seed + i (random)")
    group.add_argument("--preset", choices=tuple(PRESETS), help="sampler settings of both stages (reference)")
    group.add_argument("--sampler", choices=sorted(SAMPLERS), help="sampler of both stages (ddpm)")
    if prior:
        group.add_argument("--prior-steps", type=int, help="Stage C steps (20)")
        group.add_argument("--prior-guidance", type=float, help="Stage C guidance scale (4.0)")
        group.add_argument("--shift", type=float, help="Stage C logSNR shift (reference preset: 2.0)")
    group.add_argument("--decoder-steps", type=int, help="Stage B steps (10)")
    group.add_argument(
        "--decoder-guidance", type=float, help="Stage B guidance scale (reference preset: 1.1)"
    )
    group.add_argument("--batch-size", type=int, help="images per batch (1)")
    group.add_argument("--count", type=int, help="number of batches (1)")


def _run_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("running and output")
    group.add_argument("--dtype", choices=DTYPES, help="auto: bf16 on CUDA with bf16 support, else fp32")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    group.add_argument(
        "--offload", choices=("none", "model", "sequential"), default="none", help="CPU offload"
    )
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
    group.add_argument(
        "--from-png", metavar="FILE", help="rerun the settings stored in an image; other flags override them"
    )


def run(args: argparse.Namespace) -> int:
    task = TASKS[args.command]
    recorded = read_png(args.from_png) if args.from_png else None
    request, sources = _request(args, task, recorded)
    image = InputImage.open(args.image) if task != "txt2img" else None
    if recorded is not None and image is not None and recorded.input_image_sha256 not in (None, image.sha256):
        print(
            f"warning: {args.image} differs from the input image recorded in {args.from_png}", file=sys.stderr
        )
    seeds = request.seeds
    paths = output_paths(args.output, seeds, request.prompt)
    for folder in {path.parent for path in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype or _recorded_dtype(recorded), device)
    more = f" (images get {seeds[0]} … {seeds[-1]})" if len(seeds) > 1 else ""
    print(f"seed {request.seed}{more}")
    start = time.perf_counter()
    models = load_models(
        sources,
        torch_dtype=dtype,
        prior=task != "reconstruct",
        effnet=task in ("img2img", "reconstruct"),
        previewer=getattr(args, "preview", False),
    )
    for path, scale in getattr(args, "lora", None) or ():
        assert models.prior_pipe is not None  # --lora exists on the commands with a prior only
        name = models.prior_pipe.load_lora_weights(path, scale=scale)
        print(f"LoRA {name}: {path} at scale {scale:g}")
    place(models.pipeline, device, args.offload)
    loading = time.perf_counter() - start
    if models.prior_pipe is not None:
        models.prior_pipe.set_progress_bar_config(desc="Stage C")
    models.decoder_pipe.set_progress_bar_config(desc="Stage B")
    runner = Runner(models)

    def on_preview(index: int, step: int, preview: Any) -> None:
        preview.save(preview_path(paths[index]))

    sink = on_preview if getattr(args, "preview", False) else None
    for generated in runner.run(request, image, sink):
        path = paths[generated.index]
        save_png(generated.image, path, generated.parameters)
        print(f"saved {path}")
        if recorded is not None and generated.index == 0:
            _compare_models(recorded, generated.parameters)
    times = runner.times
    stages = f"Stage B+A {times.decoder:.1f} s"
    if task != "reconstruct":
        stages = f"Stage C {times.prior:.1f} s, {stages}"
    print(f"{stages} for {len(paths)} image(s); loading {loading:.1f} s")
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


def _request(
    args: argparse.Namespace, task: Task, recorded: GenerationParameters | None
) -> tuple[Request, ModelSources]:
    """The run's request and model sources: the recorded ones (or defaults) with the given flags."""
    request = Request(task=task) if recorded is None else Request.from_parameters(recorded, task)
    sources = ModelSources() if recorded is None else ModelSources.from_record(recorded.models)
    changes = {
        field: value
        for flag, fields in _REQUEST_FLAGS.items()
        if (value := getattr(args, flag, None)) is not None
        for field in fields
    }
    request = dataclasses.replace(request, **changes).seeded()
    if task in ("txt2img", "img2img") and recorded is None and args.prompt is None:
        raise ValueError(f"{args.command} needs a PROMPT (or --from-png with an image made by this tool)")
    request.check()
    models = {flag: value for flag in _MODEL_FLAGS if (value := getattr(args, flag, None)) is not None}
    sources = dataclasses.replace(sources, **models)
    size = sources.bundle.default_size  # the size the named model was trained at (demo: 128)
    if request.width is None and request.height is None and task != "reconstruct" and not sources.prior:
        request = dataclasses.replace(request, width=size, height=size)
    return request, sources


def _recorded_dtype(recorded: GenerationParameters | None) -> str:
    if recorded is None or recorded.dtype not in ("bf16", "fp16", "fp32"):
        return "auto"
    return recorded.dtype


def _compare_models(recorded: GenerationParameters, made: GenerationParameters) -> None:
    for role, digest in recorded.model_sha256.items():
        if made.model_sha256.get(role, digest) != digest:
            print(
                f"warning: the {role} model differs from the one recorded (sha256 {digest[:12]}…)",
                file=sys.stderr,
            )
