"""``generate``, ``img2img``, ``variation`` and ``reconstruct``: arguments → a request → saved images.

Every setting flag defaults to None, meaning "not given": the value then comes from ``--from-png``
(when given) or from the library's defaults (the preset's), so explicit flags override a PNG's
settings and nothing here duplicates a default of the library.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_cascade.cli import controls
from stable_cascade.cli.choices import OFFLOADS
from stable_cascade.cli.options import add_field_options, add_sampler_option, given_fields
from stable_cascade.fields import BY_NAME, FIELDS

if TYPE_CHECKING:  # the library loads when a command runs, not to parse arguments
    import PIL.Image

    from stable_cascade.engine import ImageRecord, Job

TASKS: dict[str, str] = {
    "generate": "txt2img",
    "img2img": "img2img",
    "variation": "variation",
    "reconstruct": "reconstruct",
}
#: Fields a rerun (``--from-png``) does not take from the record: the image's own, and what is
#: derived again from the files.
NOT_RERUN = (
    "task",
    "seed",
    "batch_size",
    "count",
    "input_image",
    *(f.name for f in FIELDS if f.kind == "sha256"),
)


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
        task = TASKS[command]
        helps = {"prompt": "the text prompt for Stage B"} if task == "reconstruct" else {}
        add_field_options(parser, task, helps=helps)
        if task != "reconstruct":
            add_sampler_option(parser)
        _run_options(parser, task != "reconstruct")
        parser.set_defaults(handler=run)


def _run_options(parser: argparse.ArgumentParser, prior: bool) -> None:
    group = parser.add_argument_group("running and output")
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
    from stable_cascade.engine import Engine, Finished, ImageDone, Preview, save_png

    task = TASKS[args.command]
    job, image, recorded = job_of(args)
    protected = [p for p in (args.from_png, getattr(args, "input_image", None)) if p]
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


def job_of(args: argparse.Namespace) -> tuple[Job, PIL.Image.Image | None, ImageRecord | None]:
    """The job of a generation command's arguments, its input image, and the record it reruns."""
    from stable_cascade.engine import read_png

    task = TASKS[args.command]
    recorded = read_png(args.from_png) if args.from_png else None
    image = _input_image(args, task, recorded)
    return _job(args, task, recorded, image), image, recorded


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
    image = open_image(args.input_image)
    wanted = recorded.job.input_image_sha256 if recorded is not None else None
    if wanted is not None and wanted != image_sha256(image):
        print(
            f"warning: {args.input_image} differs from the input image recorded in {args.from_png}",
            file=sys.stderr,
        )
    return image


def _job(
    args: argparse.Namespace, task: str, recorded: ImageRecord | None, image: PIL.Image.Image | None
) -> Job:
    """The run's job: the recorded settings (or the defaults) with the given flags."""
    from stable_cascade.engine import Job, image_sha256

    values: dict[str, Any] = {}
    if recorded is not None:
        values = _recorded_values(recorded, task, args)
    elif task in ("txt2img", "img2img") and args.prompt is None:
        raise ValueError(f"{args.command} needs a PROMPT (or --from-png with an image made by this tool)")
    given = given_fields(args)
    if "loras" in given:
        given["loras"] = [(str(path), scale) for path, scale in given["loras"]]
    values.update({k: v for k, v in given.items() if k not in controls.FIELDS})
    values.update(controls.from_flags(args, recorded.job if recorded is not None else None))
    if image is not None:
        values.update(input_image=Path(args.input_image).name, input_image_sha256=image_sha256(image))
        values["image_size"] = image.size
    job = Job.create(task=task, **values)
    recorded_controls = recorded.job.controls if recorded is not None else ()
    controls.compare(recorded_controls, job.controls, args.from_png)
    return job


def _recorded_values(recorded: ImageRecord, task: str, args: argparse.Namespace) -> dict[str, Any]:
    """The settings an image records that a rerun as ``task`` takes (its seed; not its images')."""
    old = recorded.job
    values = {
        name: value
        for name, value in old.to_dict().items()
        if name not in NOT_RERUN and name not in controls.FIELDS and value not in (None, [])
    }
    values["seed"] = recorded.seed
    if task != old.task:
        values.pop("strength", None)
    values = {name: value for name, value in values.items() if BY_NAME[name].applies(task, values)}
    for lora in old.loras:
        if not Path(lora.path).is_file() and not getattr(args, "loras", None):
            raise ValueError(
                f"the LoRA {lora.path} recorded in {args.from_png} does not exist; put it back, or pass "
                "--lora FILE[:SCALE] to use another"
            )
    if "loras" in values:
        values["loras"] = list(old.loras)
    return values


def _announce_models(recorded: ImageRecord, path: str) -> None:
    """One line naming the recorded models when they are not the default ones."""
    models = {k: v for k, v in dataclasses.asdict(recorded.job.models).items() if v is not None}
    if models != {"model": BY_NAME["model"].default} or recorded.job.loras:
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
