"""``train``: ``stable-cascade train stage-c|stage-b|stage-a|lora|previewer|controlnet|lcm|ip-adapter --data
PATH ...``.

Every option defaults to "not given" (None), so the defaults live in one place, :class:`TrainConfig`.
Multi-GPU and multi-node: run the same command under ``accelerate launch`` (or ``torchrun``).
"""

from __future__ import annotations

import argparse
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stable_cascade.cli.choices import (
    CONTROLNET_KINDS,
    DEFAULT_BUCKET_RATIOS,
    LCM_LOSSES,
    LCM_STAGES,
    LOSS_WEIGHTINGS,
    MIXED_PRECISIONS,
    RECONSTRUCTION_LOSSES,
    TRAIN_TASKS,
)

if TYPE_CHECKING:  # the library loads when a command runs, not to parse arguments
    from stable_cascade.training.config import TrainConfig

_TASKS = {
    "stage-c": "the prior (text → EfficientNet latent), optionally with its text encoder",
    "stage-b": "the decoder (EfficientNet latent → Stage A latent), optionally with the EfficientNet encoder",
    "stage-a": "the VQGAN autoencoder (reconstruction + codebook losses)",
    "lora": "LoRA adapters on a pretrained Stage C (and optionally its text encoder)",
    "previewer": "the latent previewer (EfficientNet latent → the image at 8× the latent's size)",
    "controlnet": "a Stage C ControlNet (canny, inpainting, super_resolution or simple) on a frozen Stage C",
    "lcm": "latent consistency distillation of Stage C or Stage B (--stage) from --teacher: an LCM LoRA "
    "(default) or the whole stage (--full), for few-step sampling with --preset lcm",
    "ip-adapter": "an IP-Adapter (image prompts through decoupled attention) on a frozen Stage C",
}


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    parser = commands.add_parser(
        "train",
        parents=[common],
        help="train Stage C, Stage B, Stage A, a Stage C LoRA or ControlNet, the previewer, or distil LCM",
        description="Train a stage of the cascade with the original objective (ε-prediction on the cosine "
        "schedule; P2 or adaptive loss weights) on a folder of images with .txt captions, a .jsonl "
        "manifest or .tar shards. Tasks: " + "; ".join(f"{k}: {v}" for k, v in _TASKS.items()) + ". "
        "Run under 'accelerate launch' for several GPUs or nodes.",
    )
    parser.add_argument("task", choices=TRAIN_TASKS, help="what to train")
    parser.add_argument(
        "--data",
        required=True,
        help="image folder (+ .txt captions), .jsonl manifest, .tar or folder of .tar",
    )
    parser.add_argument("-o", "--output-dir", help="checkpoints, samples and the final model (runs/<task>)")
    _model_options(parser.add_argument_group("models"))
    _data_options(parser.add_argument_group("data"))
    _lcm_options(parser.add_argument_group("LCM distillation (lcm)"))
    _optimisation_options(parser.add_argument_group("optimisation"))
    _output_options(parser.add_argument_group("checkpoints, samples and logs"))
    parser.set_defaults(handler=run)


def _model_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--pretrained", help="a pipeline folder (model_index.json) with the models")
    group.add_argument(
        "--prior", help="Stage C: model folder, pipeline folder or single file (lcm: the student's start)"
    )
    group.add_argument(
        "--decoder",
        help="Stage B model (stage-b; lcm --stage b: the student's start); for stage-c/lora/controlnet/lcm "
        "--stage c a decoder pipeline for sample images",
    )
    group.add_argument("--stage-a", help="Stage A (VQGAN): model folder, pipeline folder or single file")
    group.add_argument("--effnet", help="EfficientNet encoder: folder or single file (a .json: a fresh one)")
    group.add_argument("--text-encoder", help="a folder with text_encoder/ and tokenizer/ (or both in one)")
    group.add_argument("--previewer", help="latent previewer: model folder, pipeline folder or single file")
    group.add_argument(
        "--init-config",
        help="start the trained model fresh: a variant (tiny_prior, decoder_lite, demo_previewer, …) "
        "or config.json",
    )
    group.add_argument(
        "--train-text-encoder",
        action="store_true",
        default=None,
        help="stage-c, stage-b: train the text encoder too",
    )
    group.add_argument(
        "--train-effnet", action="store_true", default=None, help="stage-b: train the encoder too"
    )
    group.add_argument(
        "--controlnet-type", choices=CONTROLNET_KINDS, help="controlnet: the control input (canny)"
    )
    group.add_argument(
        "--controlnet-blocks", type=int, nargs="+", metavar="K", help="controlnet: ResBlock calls fed"
    )
    group.add_argument("--ip-adapter-tokens", type=int, help="ip-adapter: tokens per image prompt (4)")
    group.add_argument(
        "--ip-adapter-patches",
        action="store_true",
        default=None,
        help="ip-adapter: read the image encoder's patch tokens through a resampler",
    )
    group.add_argument(
        "--ip-adapter-image-dropout",
        type=float,
        help="ip-adapter: share of samples without their image (0.05)",
    )
    group.add_argument("--lora-rank", type=int, help="lora, lcm: adapter rank (4)")
    group.add_argument("--lora-alpha", type=float, help="lora, lcm: adapter alpha (the rank)")
    group.add_argument(
        "--lora-text-encoder", action="store_true", default=None, help="lora: adapt the text encoder too"
    )


def _lcm_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--teacher", metavar="MODEL", help="the stage's pipeline folder (or its UNet) to distil"
    )
    group.add_argument("--stage", dest="lcm_stage", choices=LCM_STAGES, help="c: Stage C, b: Stage B (c)")
    group.add_argument(
        "--full",
        dest="lcm_full",
        action="store_true",
        default=None,
        help="distil the whole UNet (its target: the EMA, --ema-decay) instead of a LoRA",
    )
    group.add_argument(
        "--teacher-steps",
        dest="lcm_teacher_steps",
        type=int,
        metavar="N",
        help="the teacher's DDIM grid (50)",
    )
    group.add_argument(
        "--teacher-guidance",
        dest="lcm_guidance",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="the teacher's CFG scale, drawn per example (Stage C 3 5, Stage B 1.1 1.1)",
    )
    group.add_argument("--lcm-loss", choices=LCM_LOSSES, help="distance to the target (huber)")
    group.add_argument("--huber-c", dest="lcm_huber_c", type=float, help="the pseudo-Huber c (0.001)")
    group.add_argument(
        "--guidance-embedding",
        dest="lcm_guidance_embedding",
        action="store_true",
        default=None,
        help="with --full: the student takes the guidance scale as an embedding",
    )


def _data_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--resolution",
        type=int,
        help="side of the square training size; buckets keep its area (the model's native side: 1024, "
        "128 for demo-derived models)",
    )
    default = ",".join(str(Fraction(r).limit_denominator(16)) for r in DEFAULT_BUCKET_RATIOS)
    group.add_argument(
        "--buckets",
        nargs="?",
        const=default,
        metavar="RATIOS",
        help=f"aspect-ratio bucketing; optional width/height ratios (default {default}, reciprocals added)",
    )
    group.add_argument("--batch-size", type=int, help="per process (4)")
    group.add_argument(
        "--effnet-scale",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="stage-b: effnet input size / image size, drawn uniformly (0.5 1.0)",
    )
    group.add_argument("--num-workers", type=int, help="data loading processes (0)")
    group.add_argument("--caption-dropout", type=float, help="share of empty captions (0.05)")
    group.add_argument(
        "--image-conditioning",
        type=float,
        help="stage-c with an image encoder: share of samples given their CLIP image embedding, else zeros "
        "(0.1; examples whose manifest line names an image_prompt always get that image's)",
    )


def _optimisation_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--steps", type=int, help="optimizer steps (1000)")
    group.add_argument("--lr", type=float, help="AdamW learning rate (1e-4)")
    group.add_argument("--weight-decay", type=float, help="AdamW weight decay (0.01)")
    group.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up (0)")
    group.add_argument("--grad-clip", type=float, help="gradient norm clipping, 0 = off (1.0)")
    group.add_argument("--ema-decay", type=float, help="EMA of the weights, 0 = off (0.999)")
    group.add_argument("--loss-weighting", choices=LOSS_WEIGHTINGS, help="per-noise-level weights (p2)")
    group.add_argument(
        "--pyramid-noise-max-side", type=int, help="stage-b: coarsest noise levels' side, 0 = Gaussian (16)"
    )
    group.add_argument("--reconstruction-loss", choices=RECONSTRUCTION_LOSSES, help="stage-a (mse)")
    group.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, help="bf16 autocast (no)")
    group.add_argument(
        "--gradient-checkpointing", action="store_true", default=None, help="trade compute for memory"
    )
    group.add_argument("--seed", type=int, help="seed of everything random (0)")


def _output_options(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (500)")
    group.add_argument("--resume", metavar="DIR|latest", help="continue from a checkpoint, exactly")
    group.add_argument("--sample-every", type=int, help="steps between sample images, 0 = none (0)")
    group.add_argument("--sample-prompts", nargs="+", metavar="PROMPT", help="(captions of the first images)")
    group.add_argument("--log-every", type=int, help="steps between log lines (50)")


_OPTIONS = (
    "pretrained", "prior", "decoder", "stage_a", "effnet", "text_encoder", "previewer", "init_config",
    "train_text_encoder", "train_effnet", "lora_rank", "lora_alpha", "lora_text_encoder", "resolution",
    "batch_size", "effnet_scale", "num_workers", "caption_dropout", "image_conditioning", "steps", "lr",
    "weight_decay", "warmup_steps", "grad_clip", "ema_decay", "loss_weighting", "pyramid_noise_max_side",
    "reconstruction_loss", "mixed_precision", "gradient_checkpointing", "seed", "checkpoint_every",
    "resume", "sample_every", "sample_prompts", "log_every", "controlnet_type", "controlnet_blocks",
    "teacher", "lcm_stage", "lcm_full", "lcm_teacher_steps", "lcm_guidance", "lcm_loss", "lcm_huber_c",
    "lcm_guidance_embedding",
    "ip_adapter_tokens", "ip_adapter_patches", "ip_adapter_image_dropout",
)  # fmt: skip


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The run's config: the given options over :class:`TrainConfig`'s defaults."""
    from stable_cascade.training.config import TrainConfig

    values = {name: value for name in _OPTIONS if (value := getattr(args, name)) is not None}
    if args.buckets is not None:
        values["buckets"] = _ratios(args.buckets)
    output = Path(args.output_dir or Path("runs") / args.task)
    return TrainConfig(task=args.task, data=Path(args.data), output_dir=output, **values)


def _ratios(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(Fraction(part.strip())) for part in text.split(",") if part.strip())
    except (ValueError, ZeroDivisionError) as error:
        raise ValueError(f"--buckets takes width/height ratios like 1/1,3/4,16/9; got {text!r}") from error


def run(args: argparse.Namespace) -> int:
    from stable_cascade.training.trainer import train

    config = config_from_args(args)
    logging.getLogger("stable_cascade.training").setLevel(logging.INFO)
    final = train(config)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"trained {config.task}: {final}")
    return 0
