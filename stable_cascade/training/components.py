"""The models a training run uses: loaded from a pipeline folder and/or single pieces, or fresh ones.

``--pretrained`` is a pipeline folder as our (and diffusers') ``save_pretrained`` writes it; the pieces
(``--prior``, ``--decoder``, ``--stage-a``, ``--effnet``, ``--previewer``) are model folders, pipeline
folders or original single files and override it; ``--text-encoder`` is a folder with ``text_encoder/`` and
``tokenizer/`` (any pipeline folder) or one holding both. ``--init-config`` replaces the trained model
with a fresh one, initialised as the original ``StageC``/``StageB``/``StageA`` constructors do (a
previewer: PyTorch's default init, as the original ``Previewer``).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import nn
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

from stable_cascade.checkpoint import PretrainedModel, read_json_object
from stable_cascade.loading.components import (
    MODEL_INDEX,
    load_component,
    read_model_index,
    transformers_from_pretrained,
)
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.layers import ResBlock, TimestepBlock
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import MixingBlock, PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import (
    PREVIEWER_VARIANTS,
    UNET_VARIANTS,
    VQ_VARIANTS,
    ConfigBase,
    PreviewerConfig,
    UNetConfig,
    VQConfig,
)
from stable_cascade.training.config import TrainConfig

M = TypeVar("M", bound=PretrainedModel)

#: Pipeline component name → Components field.
_FIELDS = {
    "prior": "prior",
    "decoder": "decoder",
    "vqgan": "stage_a",
    "effnet": "effnet",
    "text_encoder": "text_encoder",
    "tokenizer": "tokenizer",
    "image_encoder": "image_encoder",
    "feature_extractor": "feature_extractor",
    "previewer": "previewer",
}
#: What each task reads from a pipeline folder.
_PRIOR_PARTS = (
    "prior",
    "effnet",
    "text_encoder",
    "tokenizer",
    "image_encoder",
    "feature_extractor",
    "previewer",
)
_DECODER_PARTS = ("decoder", "vqgan", "effnet", "text_encoder", "tokenizer")
_NEEDED = {
    "stage-c": _PRIOR_PARTS,
    "lora": _PRIOR_PARTS,
    "controlnet": _PRIOR_PARTS,
    "stage-b": _DECODER_PARTS,
    "stage-a": ("vqgan",),
    "previewer": ("effnet", "previewer"),
}
#: What ``lcm`` reads from the teacher pipeline, per stage.
_TEACHER_PARTS = {"c": _PRIOR_PARTS, "b": _DECODER_PARTS}
#: The model each task trains: its Components field, config class and named variants.
_TRAINED: dict[str, tuple[str, type[ConfigBase], dict[str, Any]]] = {
    "stage-c": ("prior", UNetConfig, UNET_VARIANTS),
    "lora": ("prior", UNetConfig, UNET_VARIANTS),
    "stage-b": ("decoder", UNetConfig, UNET_VARIANTS),
    "stage-a": ("stage_a", VQConfig, VQ_VARIANTS),
    "previewer": ("previewer", PreviewerConfig, PREVIEWER_VARIANTS),
}


@dataclasses.dataclass
class Components:
    """Models and encoders for a run; the task says which it needs (``None``: not available)."""

    prior: StableCascadeUNet | None = None
    decoder: StableCascadeUNet | None = None
    stage_a: PaellaVQModel | None = None
    effnet: EfficientNetEncoder | None = None
    tokenizer: Any = None  # a CLIP tokenizer
    text_encoder: CLIPTextModelWithProjection | None = None
    image_encoder: Any = None  # CLIPVisionModelWithProjection
    feature_extractor: Any = None  # CLIPImageProcessor
    previewer: Previewer | None = None
    #: LCM distillation: the student's starting point when it is not the teacher (``prior``/``decoder``).
    student: StableCascadeUNet | None = None


def load_components(config: TrainConfig) -> Components:
    """The components ``config`` names, then a fresh trained model if ``init_config`` is given.

    ``lcm``: the teacher pipeline gives the stage's UNet (as ``prior`` or ``decoder``) and its encoders;
    ``--prior`` (``--stage c``) or ``--decoder`` (``--stage b``) is the student's start (``student``).
    """
    found = Components()
    lcm_unet = {"c": "prior", "b": "decoder"}[config.lcm_stage] if config.task == "lcm" else None
    if config.pretrained is not None:  # (lcm: the encoders; its stage's UNet is the teacher's)
        needed = _NEEDED.get(config.task, _TEACHER_PARTS[config.lcm_stage])
        _from_pipeline(found, config.pretrained, tuple(name for name in needed if name != lcm_unet))
    if config.teacher is not None:
        _from_teacher(found, config.teacher, _TEACHER_PARTS[config.lcm_stage], lcm_unet or "prior")
    pieces: dict[str, tuple[Path | None, type[PretrainedModel], str]] = {
        "prior": (config.prior, StableCascadeUNet, "prior"),
        "decoder": (config.decoder, StableCascadeUNet, "decoder"),
        "stage_a": (config.stage_a, PaellaVQModel, "vqgan"),
        "effnet": (config.effnet, EfficientNetEncoder, "effnet"),
        "previewer": (config.previewer, Previewer, "previewer"),
    }
    for field, (path, cls, name) in pieces.items():
        if path is None:
            continue
        if field == lcm_unet:
            found.student = load_model(StableCascadeUNet, path, name, seed=config.seed)
        elif not (field == "decoder" and config.task in ("stage-c", "lora", "controlnet", "lcm")):
            # (those runs take --decoder as a decoder pipeline for sample images: samples.py)
            setattr(found, field, load_model(cls, path, name, seed=config.seed))
    if config.text_encoder is not None:
        found.tokenizer, found.text_encoder = load_text_encoder(config.text_encoder)
    if config.init_config is not None:
        setattr(found, _TRAINED[config.task][0], fresh_model(config.task, config.init_config, config.seed))
    return found


def _from_pipeline(found: Components, folder: Path, names: tuple[str, ...]) -> None:
    index = read_model_index(folder)
    for name in names:
        entry = index.get(name)
        if not isinstance(entry, list) or len(entry) != 2 or None in entry:
            continue
        setattr(found, _FIELDS[name], load_component(folder, name, entry[0], entry[1]))


def _from_teacher(found: Components, teacher: Path, names: tuple[str, ...], unet: str) -> None:
    """The teacher's stage UNet and encoders: a pipeline folder, or the UNet alone (a model folder or
    single file; the encoders then come from --pretrained or the pieces)."""
    if (Path(teacher) / MODEL_INDEX).is_file():
        _from_pipeline(found, teacher, names)
    else:
        setattr(found, unet, load_model(StableCascadeUNet, teacher, unet))


def load_model(cls: type[M], path: Path, component: str, seed: int = 0) -> M:
    """A model from a model folder, a pipeline folder (its ``component``), a single file, or a fresh
    one from a ``.json`` config."""
    path = Path(path)
    if path.suffix == ".json" and path.is_file():
        return _seeded(lambda: cls(read_json_object(path)), seed)  # type: ignore[call-arg]
    if path.is_dir():
        if (path / MODEL_INDEX).is_file():
            return cls.from_pretrained(path, subfolder=component)
        return cls.from_pretrained(path)
    if path.is_file():
        return cls.from_single_file(path)
    raise FileNotFoundError(
        f"{path} does not exist (expected a model folder, pipeline folder or .safetensors file)"
    )


def load_text_encoder(folder: Path) -> tuple[CLIPTokenizer, CLIPTextModelWithProjection]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--text-encoder {folder} is not a folder")
    split = (folder / "text_encoder").is_dir()
    encoder = transformers_from_pretrained(
        CLIPTextModelWithProjection, folder, "text_encoder", "text_encoder" if split else ""
    )
    tokenizer = transformers_from_pretrained(CLIPTokenizer, folder, "tokenizer", "tokenizer" if split else "")
    return tokenizer, encoder.eval()


def fresh_model(task: str, init_config: str, seed: int) -> PretrainedModel:
    """A new model of ``init_config`` (a variant name or a config.json), seeded by ``seed``."""
    _, config_class, variants = _TRAINED[task]
    path = Path(init_config)
    if init_config in variants:
        config = variants[init_config]
    elif path.is_file():
        data = read_json_object(path)
        config = config_class.from_dict(data, source=str(path))
    else:
        raise ValueError(
            f"--init-config {init_config!r} is neither a variant ({', '.join(variants)}) nor a config file"
        )
    if isinstance(config, UNetConfig) and config.is_stage_b != (task == "stage-b"):
        wanted = "a Stage B (decoder)" if task == "stage-b" else "a Stage C (prior)"
        raise ValueError(
            f"--init-config {init_config!r} does not describe {wanted} UNet, which {task} trains"
        )
    if task == "stage-a":
        return _seeded(lambda: init_stage_a(PaellaVQModel(config)), seed)
    if task == "previewer":
        return _seeded(lambda: Previewer(config), seed)
    return _seeded(lambda: init_unet(StableCascadeUNet(config)), seed)


def _seeded(build: Any, seed: int) -> Any:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


@torch.no_grad()
def init_unet(unet: StableCascadeUNet) -> StableCascadeUNet:
    """The original ``StageC``/``StageB`` init: xavier-uniform convs and linears with zero biases;
    conditioning mappers N(0, 0.02); input embedding xavier with gain 0.02; zero output head; each
    ResBlock's last linear scaled by √(1 / down blocks); zero timestep modulation."""
    for module in unet.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for name in ("clip_txt_pooled_mapper", "clip_txt_mapper", "clip_img_mapper"):
        if hasattr(unet, name):
            nn.init.normal_(getattr(unet, name).weight, std=0.02)
    for name in ("effnet_mapper", "pixels_mapper"):
        if hasattr(unet, name):
            nn.init.normal_(getattr(unet, name)[0].weight, std=0.02)
            nn.init.normal_(getattr(unet, name)[2].weight, std=0.02)
    nn.init.xavier_uniform_(cast(nn.Conv2d, unet.embedding[1]).weight, gain=0.02)
    nn.init.zeros_(cast(nn.Conv2d, unet.clf[1]).weight)
    scale = float(np.sqrt(1 / sum(unet.config.down_num_layers_per_block)))
    for module in unet.modules():
        if isinstance(module, ResBlock):
            cast(nn.Linear, module.channelwise[-1]).weight.mul_(scale)
        elif isinstance(module, TimestepBlock):
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.zeros_(layer.weight)
    return unet


@torch.no_grad()
def init_stage_a(model: PaellaVQModel) -> PaellaVQModel:
    """The original ``StageA`` init: xavier-uniform convs and linears with zero biases in its blocks."""
    for block in model.modules():
        if isinstance(block, MixingBlock):
            for module in block.modules():
                if isinstance(module, (nn.Conv2d, nn.Linear)):
                    nn.init.xavier_uniform_(module.weight)
                    if module.bias is not None:
                        nn.init.zeros_(module.bias)
    return model
