"""``TrainConfig``: everything a training run depends on, as one frozen, JSON-serialisable dataclass.

Defaults follow the original Stable Cascade training code (``train/train_c.py``, ``train_b.py``,
``gdf``): AdamW, gradient clipping at 1.0, P2 loss weighting, 5 % caption dropout, CLIP image
conditioning for 10 % of Stage C samples, effnet conditioning dropped for 10 % of Stage B samples.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Literal, get_args

from stable_cascade.loading.native import Component, config_native_size, model_native_size
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS, UNetConfig, VQConfig

Task = Literal["stage-c", "stage-b", "stage-a", "lora", "previewer", "controlnet", "lcm", "ip-adapter"]
ControlNetKind = Literal["canny", "inpainting", "super_resolution", "simple"]
LossWeighting = Literal["p2", "adaptive", "none"]
MixedPrecision = Literal["no", "bf16"]
ReconstructionLoss = Literal["mse", "l1"]
LCMStage = Literal["c", "b"]
LCMLoss = Literal["huber", "l2"]
#: The teacher's guidance range per stage when ``lcm_guidance`` is not given: Stage C around the
#: reference preset's 4, Stage B its own 1.1.
LCM_GUIDANCE: dict[str, tuple[float, float]] = {"c": (3.0, 5.0), "b": (1.1, 1.1)}

#: The original fine-tuning configs' aspect ratios (width / height); their reciprocals are added.
DEFAULT_BUCKET_RATIOS: tuple[float, ...] = (1.0, 4 / 5, 3 / 4, 2 / 3, 3 / 5, 9 / 16, 1 / 2)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. Paths may be ``str`` or ``Path``; ``None`` means "not given"."""

    task: Task
    data: Path  # image folder, .jsonl manifest, .tar shard or folder of shards
    output_dir: Path
    # Models: a pipeline folder and/or the pieces; ``init_config`` starts the trained model fresh.
    pretrained: Path | None = None
    prior: Path | None = None
    decoder: Path | None = None
    stage_a: Path | None = None
    effnet: Path | None = None
    text_encoder: Path | None = None
    previewer: Path | None = None
    init_config: str | None = None  # a variant name (UNET/VQ/PREVIEWER_VARIANTS) or a config.json
    # Data
    resolution: int = None  # type: ignore[assignment]  # None: the trained model's native side (1024, demo 128)
    buckets: tuple[float, ...] | None = None  # aspect ratios (w / h); None: square center crops
    batch_size: int = 4  # per process
    num_workers: int = 0
    caption_dropout: float = 0.05
    image_conditioning: float = 0.1  # Stage C: share of samples given their CLIP image embedding
    # (an example whose manifest names an ``image_prompt`` always gets that image's)
    effnet_dropout: float = 0.1  # Stage B: share of samples whose effnet condition is zeroed
    pixels_conditioning: float = 0.0  # Stage B: share given the 8x8 image (original: 0, as inference)
    effnet_scale: tuple[float, float] = (0.5, 1.0)  # Stage B: effnet input size / image size, uniform
    pyramid_noise_max_side: int = 16  # Stage B: coarse noise levels up to this side; 0: plain Gaussian
    # Optimisation
    steps: int = 1000
    lr: float = 1e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    grad_clip: float = 1.0
    ema_decay: float = 0.999  # 0 disables the EMA
    loss_weighting: LossWeighting = "p2"
    reconstruction_loss: ReconstructionLoss = "mse"  # Stage A
    mixed_precision: MixedPrecision = "no"
    gradient_checkpointing: bool = False
    seed: int = 0
    # What is trained besides the task's model
    train_text_encoder: bool = False  # stage-c, stage-b
    train_effnet: bool = False  # stage-b
    lora_rank: int = 4
    lora_alpha: float | None = None
    lora_text_encoder: bool = False
    controlnet_type: ControlNetKind = "canny"
    controlnet_blocks: tuple[int, ...] | None = None  # ResBlock calls fed (default: see controlnet_task)
    ip_adapter_tokens: int = 4  # image tokens per image prompt
    ip_adapter_patches: bool = False  # the image encoder's patch tokens through a resampler
    ip_adapter_image_dropout: float = 0.05  # share of samples whose adapter input is zeroed
    # LCM distillation (task lcm): the teacher pipeline, the stage, LoRA (default) or the full stage
    teacher: Path | None = None
    lcm_stage: LCMStage = "c"
    lcm_full: bool = False  # the whole UNet, its target an EMA copy (ema_decay); else a LoRA
    lcm_teacher_steps: int = 50  # N: the teacher's DDIM grid; one step of it is the skip
    lcm_guidance: tuple[float, float] | None = None  # the teacher's CFG scale, uniform per example
    lcm_loss: LCMLoss = "huber"
    lcm_huber_c: float = 0.001
    lcm_guidance_embedding: bool = False  # full only: the student takes the guidance as an embedding
    # Checkpoints, samples, logs
    checkpoint_every: int = 500
    resume: str | None = None  # a checkpoint folder or "latest"
    sample_every: int = 0  # 0: no samples
    sample_prompts: tuple[str, ...] = ()
    log_every: int = 50

    def __post_init__(self) -> None:
        for name in ("data", "output_dir"):
            object.__setattr__(self, name, Path(getattr(self, name)))
        for name in (
            "pretrained",
            "prior",
            "decoder",
            "stage_a",
            "effnet",
            "text_encoder",
            "previewer",
            "teacher",
        ):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, Path(value))
        if self.buckets is not None:
            object.__setattr__(self, "buckets", tuple(float(r) for r in self.buckets))
        object.__setattr__(self, "effnet_scale", tuple(float(r) for r in self.effnet_scale))
        object.__setattr__(self, "sample_prompts", tuple(self.sample_prompts))
        if self.controlnet_blocks is not None:
            object.__setattr__(self, "controlnet_blocks", tuple(int(b) for b in self.controlnet_blocks))
        if self.resolution is None:
            object.__setattr__(self, "resolution", self.native_resolution())
        if self.lcm_guidance is not None:
            object.__setattr__(self, "lcm_guidance", tuple(float(w) for w in self.lcm_guidance))
        self._check()
        if self.task == "lcm":
            self._check_lcm()

    def native_resolution(self) -> int:
        """The side the trained model makes images at, for ``resolution`` left out: 128 for a model of the
        demo's architecture (``--pretrained`` the demo, a demo-derived ``--prior``, ``--init-config
        demo_prior``; see :mod:`stable_cascade.loading.native`), else the released models' 1024."""
        component = _NATIVE_COMPONENT.get(self.task)
        if component is None:
            return DEFAULT_RESOLUTION
        piece = {"prior": self.prior, "decoder": self.decoder, "vqgan": self.stage_a}[component]
        found = None
        if piece is not None:
            found = model_native_size(piece, component)
        elif self.pretrained is not None:
            found = model_native_size(self.pretrained, component)
        elif (variant := _VARIANTS.get(self.init_config or "")) is not None:
            found = config_native_size(variant, component)
        elif self.init_config is not None:
            found = model_native_size(self.init_config, component)
        return found or DEFAULT_RESOLUTION

    def _check(self) -> None:
        _choice("task", self.task, Task)
        _choice("controlnet_type", self.controlnet_type, ControlNetKind)
        _choice("loss_weighting", self.loss_weighting, LossWeighting)
        _choice("mixed_precision", self.mixed_precision, MixedPrecision)
        _choice("reconstruction_loss", self.reconstruction_loss, ReconstructionLoss)
        _choice("lcm_stage", self.lcm_stage, LCMStage)
        _choice("lcm_loss", self.lcm_loss, LCMLoss)
        for name, high in _COUNT_LIMITS.items():
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ValueError(f"{name} must be a whole number from 1 to {high:,}, got {value!r}")
        for name in ("lr", "weight_decay", "grad_clip"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        scale = self.effnet_scale
        if len(scale) != 2 or not 0.0 < scale[0] <= scale[1] <= 1.0:
            raise ValueError(f"effnet_scale is a range (low, high) with 0 < low <= high <= 1, got {scale}")
        for name in (
            "num_workers",
            "pyramid_noise_max_side",
            "warmup_steps",
            "sample_every",
            "weight_decay",
            "grad_clip",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "caption_dropout",
            "image_conditioning",
            "effnet_dropout",
            "pixels_conditioning",
            "ip_adapter_image_dropout",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability in [0, 1], got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 disables the EMA), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.buckets is not None and (not self.buckets or min(self.buckets) <= 0):
            raise ValueError(f"buckets are positive aspect ratios (width / height), got {self.buckets}")
        _only_for(self, "train_text_encoder", ("stage-c", "stage-b"), "the text encoder, jointly")
        _only_for(self, "train_effnet", ("stage-b",), "the EfficientNet encoder, jointly with Stage B")
        _only_for(self, "lora_text_encoder", ("lora",), "LoRA adapters on the text encoder")
        _only_for(self, "ip_adapter_patches", ("ip-adapter",), "an IP-Adapter reading patch tokens")
        if self.task in ("lora", "controlnet", "lcm", "ip-adapter") and self.init_config is not None:
            given = "--teacher" if self.task == "lcm" else "--pretrained or --prior"
            trained = "a pretrained stage" if self.task == "lcm" else "a pretrained Stage C"
            raise ValueError(
                f"{self.task} trains on {trained}; --init-config (a fresh model) makes no sense with it: "
                f"pass {given}"
            )
        if self.teacher is not None and self.task != "lcm":
            raise ValueError(f"--teacher is the model LCM distillation learns from; {self.task} takes none")
        if self.task in ("stage-a", "previewer") and self.loss_weighting == "adaptive":
            raise ValueError(f"{self.task} has no noise levels to weight; drop --loss-weighting adaptive")

    def _check_lcm(self) -> None:
        if self.teacher is None:
            raise ValueError(
                "lcm distils a teacher: pass --teacher MODEL (a prior pipeline folder for --stage c, a "
                "decoder pipeline folder for --stage b)"
            )
        low, high = self.teacher_guidance
        if not (math.isfinite(low) and math.isfinite(high) and 0.0 <= low <= high):
            raise ValueError(
                "--teacher-guidance is a range LOW HIGH of CFG scales with 0 <= LOW <= HIGH, got "
                f"{low} {high}"
            )
        if not (math.isfinite(self.lcm_huber_c) and self.lcm_huber_c > 0):
            raise ValueError(f"--huber-c must be a positive number, got {self.lcm_huber_c}")
        if self.lcm_full and self.ema_decay == 0:
            raise ValueError(
                "full LCM distillation takes its target from the EMA of the student: set --ema-decay "
                "(e.g. 0.95), not 0"
            )
        if self.lcm_guidance_embedding and not self.lcm_full:
            raise ValueError("--guidance-embedding adds weights to the student UNet: use it with --full")

    @property
    def teacher_guidance(self) -> tuple[float, float]:
        """The teacher's CFG range (LCM): ``lcm_guidance`` or the stage's default."""
        return self.lcm_guidance or LCM_GUIDANCE[self.lcm_stage]  # type: ignore[return-value]

    @property
    def bucket_ratios(self) -> tuple[float, ...]:
        """Every aspect ratio with its reciprocal, sorted (``(1.0,)`` without buckets)."""
        if self.buckets is None:
            return (1.0,)
        return tuple(sorted({round(r, 6) for ratio in self.buckets for r in (ratio, 1 / ratio)}))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: paths as strings, tuples as lists."""
        values = dataclasses.asdict(self)
        return {
            k: str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v
            for k, v in values.items()
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(unknown)}")
        return cls(**values)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


DEFAULT_RESOLUTION = 1024
_VARIANTS: dict[str, UNetConfig | VQConfig] = {**UNET_VARIANTS, **VQ_VARIANTS}
#: The model whose native side is the default resolution of each task (the previewer's: 1024).
_NATIVE_COMPONENT: dict[str, Component] = {
    "stage-c": "prior",
    "lora": "prior",
    "controlnet": "prior",
    "ip-adapter": "prior",
    "stage-b": "decoder",
    "stage-a": "vqgan",
}
#: Upper bounds of the counts (they catch typos such as a resolution of 10240000).
_COUNT_LIMITS = {
    "resolution": 16_384,
    "batch_size": 65_536,
    "steps": 10**9,
    "checkpoint_every": 10**9,
    "log_every": 10**9,
    "lora_rank": 4_096,
    "ip_adapter_tokens": 256,
    "lcm_teacher_steps": 10_000,
}


def _choice(name: str, value: object, kind: Any) -> None:
    choices = get_args(kind)
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _only_for(config: TrainConfig, flag: str, tasks: tuple[str, ...], what: str) -> None:
    if getattr(config, flag) and config.task not in tasks:
        option = "--" + flag.replace("_", "-")
        raise ValueError(
            f"{option} ({flag}) trains {what} and only works with {' / '.join(tasks)}, "
            f"not {config.task}; drop it or change the task"
        )
