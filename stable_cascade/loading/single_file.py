"""Pipelines from original single files and ComfyUI bundles: the work behind ``from_single_file``.

Each UNet (and Stage A, the EfficientNet encoder, the previewer) is read from its file with the
architecture inferred from the tensors, so released models (full, lite, bf16), fine-tunes and test
sizes all load. A ComfyUI bundle also supplies what it holds (``vae.`` Stage A or EfficientNet +
previewer, ``text_encoder.``, ``clip_l_vision.``; :func:`convert.split_bundle`). Everything else
comes from ``components_repo``, a diffusers repo id or folder, read only for what
is missing: the tokenizer, the CLIP encoders, the feature extractor and the scheduler
(``DDPMWuerstchenScheduler()`` when the repo has none). Objects passed by the caller win over the
bundle, which wins over the repo.

A path may be a local file or ``"owner/repo/[folder/]file.safetensors"``, fetched through the Hub
cache (``HF_HUB_OFFLINE``, ``local_files_only``, ``revision``, ``token`` apply). ``save_pretrained`` on
the resulting pipeline writes the diffusers layout: that is the export to diffusers.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from torch import nn

from stable_cascade.checkpoint import (
    CheckpointError,
    HubOptions,
    PretrainedModel,
    parse_dtype,
    read_json_object,
    resolve_file,
)
from stable_cascade.checkpoint.safetensors_io import read_single_file
from stable_cascade.conditioning.clip_weights import clip_text_model, clip_vision_model, normalize_clip_keys
from stable_cascade.convert import Kind, expect_kind, identify, split_bundle
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.loading.bundles import DECODER_REPO, PRIOR_REPO
from stable_cascade.loading.components import is_component_entry, load_component, read_model_index
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import ConfigBase, EffNetConfig, PreviewerConfig

logger = logging.getLogger(__name__)

Tensors = Mapping[str, torch.Tensor]
M = TypeVar("M", bound=PretrainedModel)
#: What a components folder without ``model_index.json`` is assumed to hold, by subfolder.
DEFAULT_ENTRIES = {
    "tokenizer": ("transformers", "CLIPTokenizer"),
    "text_encoder": ("transformers", "CLIPTextModelWithProjection"),
    "image_encoder": ("transformers", "CLIPVisionModelWithProjection"),
    "feature_extractor": ("transformers", "CLIPImageProcessor"),
    "scheduler": ("diffusers", "DDPMWuerstchenScheduler"),
}


@dataclasses.dataclass(frozen=True)
class LoadOptions:
    """How files are read: models cast to ``dtype``, pickle only if allowed, Hub options."""

    dtype: torch.dtype = torch.float32
    allow_pickle: bool = False
    hub: HubOptions = dataclasses.field(default_factory=HubOptions)

    @classmethod
    def create(
        cls,
        torch_dtype: torch.dtype | str | None,
        allow_pickle: bool,
        revision: str | None,
        cache_dir: str | Path | None,
        local_files_only: bool | None,
        token: str | bool | None,
    ) -> LoadOptions:
        """The options of a ``from_single_file`` call (float32 when ``torch_dtype`` is None, as diffusers)."""
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        return cls(parse_dtype(torch_dtype) or torch.float32, allow_pickle, hub)


def resolve_checkpoint(path: str | Path, hub: HubOptions | None = None) -> Path:
    """A local file as is; else ``"owner/repo/[folder/]file"`` through the Hub cache."""
    local = Path(path)
    if local.is_file():
        return local
    parts = str(path).split("/")
    if local.is_absolute() or local.exists() or len(parts) < 3 or "" in parts:
        raise FileNotFoundError(
            f"{path} is not a file; pass a local checkpoint file or a Hub file as "
            "'owner/repo/file.safetensors' (e.g. 'stabilityai/stable-cascade/stage_a.safetensors')"
        )
    return resolve_file("/".join(parts[:2]), parts[-1], "/".join(parts[2:-1]) or None, hub)


@dataclasses.dataclass(frozen=True)
class SingleFile:
    """The tensors of one checkpoint file, split into parts when it is a ComfyUI bundle."""

    source: str
    tensors: Tensors
    parts: Mapping[str, Tensors]

    @classmethod
    def read(cls, path: str | Path, options: LoadOptions) -> SingleFile:
        file = resolve_checkpoint(path, options.hub)
        tensors = read_single_file(file, options.allow_pickle)
        bundle = identify(tensors).kind is Kind.COMFY_BUNDLE
        return cls(str(file), tensors, split_bundle(tensors) if bundle else {})

    def component(self, kind: Kind, argument: str) -> Tensors:
        """The tensors of ``kind`` (the file, or its bundle part), or an error naming ``argument``."""
        try:
            expect_kind(self.tensors, kind, self.source)
        except CheckpointError as error:
            raise CheckpointError(f"{argument}: {error}") from error
        return self.parts[_PART[kind]] if self.parts else self.tensors


#: The bundle part (:func:`convert.split_bundle`) holding each kind.
_PART = {
    Kind.STAGE_C: "unet",
    Kind.STAGE_B: "unet",
    Kind.STAGE_A: "stage_a",
    Kind.EFFNET: "effnet",
    Kind.PREVIEWER: "previewer",
}


def effnet_config(tensors: Tensors, source: str) -> EffNetConfig:
    """An EfficientNet encoder's widths and depths (:meth:`EfficientNetEncoder.config_from_single_file`)."""
    return EfficientNetEncoder.config_from_single_file(tensors, source)


def previewer_config(tensors: Tensors, source: str) -> PreviewerConfig:
    """A previewer's widths (:meth:`Previewer.config_from_single_file`)."""
    return Previewer.config_from_single_file(tensors, source)


def _build(cls: type[M], config: ConfigBase, tensors: Tensors, source: str, options: LoadOptions) -> M:
    return cls.from_state_dict(config, tensors, source=source, dtype=options.dtype, copy=False)


def unet(file: SingleFile, kind: Kind, argument: str, options: LoadOptions) -> StableCascadeUNet:
    """The Stage C or Stage B UNet of ``file`` (refusing any other component)."""
    tensors = file.component(kind, argument)
    config = StableCascadeUNet.config_from_single_file(tensors, file.source)
    weights = StableCascadeUNet.convert_single_file(dict(tensors))
    return _build(StableCascadeUNet, config, weights, file.source, options)


def _stage_a(tensors: Tensors, source: str, options: LoadOptions) -> PaellaVQModel:
    config = PaellaVQModel.config_from_single_file(tensors, source)  # the original latent scale 0.43
    return _build(PaellaVQModel, config, PaellaVQModel.convert_single_file(dict(tensors)), source, options)


def _effnet(tensors: Tensors, source: str, options: LoadOptions) -> EfficientNetEncoder:
    return _build(EfficientNetEncoder, effnet_config(tensors, source), tensors, source, options)


def _previewer(tensors: Tensors, source: str, options: LoadOptions) -> Previewer:
    return _build(Previewer, previewer_config(tensors, source), tensors, source, options)


_LOADERS: dict[Kind, tuple[type[nn.Module], Callable[[Tensors, str, LoadOptions], nn.Module]]] = {
    Kind.STAGE_A: (PaellaVQModel, _stage_a),
    Kind.EFFNET: (EfficientNetEncoder, _effnet),
    Kind.PREVIEWER: (Previewer, _previewer),
}


def auxiliary(
    value: str | Path | nn.Module | None, kind: Kind, argument: str, bundle: SingleFile, options: LoadOptions
) -> Any:
    """Stage A, the EfficientNet encoder or the previewer: the given model, the file at the given path,
    the bundle's part, or None."""
    cls, load = _LOADERS[kind]
    if isinstance(value, cls):
        return value
    if isinstance(value, nn.Module) or not (value is None or isinstance(value, (str, Path))):
        raise TypeError(f"{argument} must be a path or a {cls.__name__}, got {type(value).__name__}")
    if value is not None:
        file = SingleFile.read(value, options)
        return load(file.component(kind, argument), file.source, options)
    part = bundle.parts.get(_PART[kind])
    return None if part is None else load(part, f"{bundle.source} ({kind.value} part)", options)


class ComponentsRepo:
    """The diffusers repo or folder that supplies what the single files lack; read only when needed.

    Its ``model_index.json`` says which components it has; a folder without one is taken to hold
    :data:`DEFAULT_ENTRIES` in the subfolders that exist. ``None``: nothing comes from a repo.
    """

    def __init__(self, root: str | Path | None, options: LoadOptions) -> None:
        self.root = root
        self.options = options
        self._index: dict[str, Any] | None = None

    def entry(self, name: str) -> tuple[str, str] | None:
        """The ``[library, class]`` of component ``name``, or None when the repo lacks it."""
        if self.root is None:
            return None
        if self._index is None:
            try:
                self._index = read_model_index(self.root, self.options.hub)
            except FileNotFoundError:
                self._index = {}
        if self._index:
            value: Any = self._index.get(name)
            return (value[0], value[1]) if is_component_entry(value) and value[0] and value[1] else None
        local = Path(self.root).is_dir()
        return DEFAULT_ENTRIES[name] if not local or (Path(self.root) / name).is_dir() else None

    def load(self, name: str, required: bool = False) -> Any:
        """Component ``name`` from the repo; a ``ValueError`` saying what to pass when it is required."""
        entry = self.entry(name)
        if entry is None:
            if required:
                where = (
                    f"components_repo {str(self.root)!r} has no {name!r}"
                    if self.root
                    else "no components_repo"
                )
                raise ValueError(
                    f"{where}: pass {name}=..., or components_repo= a diffusers repo or folder with a "
                    f"{name}/ subfolder (e.g. {PRIOR_REPO!r})"
                )
            return None
        return load_component(
            self.root or "", name, *entry, torch_dtype=self.options.dtype, hub=self.options.hub
        )

    def scheduler(self) -> DDPMWuerstchenScheduler:
        """The repo's scheduler, or ``DDPMWuerstchenScheduler()`` (diffusers' defaults)."""
        scheduler = self.load("scheduler")
        return scheduler if scheduler is not None else DDPMWuerstchenScheduler()

    def config_hints(self, name: str, width: int | None) -> dict[str, Any]:
        """Heads and activation of component ``name`` from its ``config.json``, the two CLIP values the
        weights cannot tell (:mod:`conditioning.clip_weights`); only when the widths agree."""
        if self.root is None or self.entry(name) is None:
            return {}
        try:
            path = resolve_file(self.root, "config.json", name, self.options.hub)
        except FileNotFoundError:
            return {}
        config = read_json_object(path)
        if config.get("hidden_size") != width:
            return {}
        return {k: config[k] for k in ("num_attention_heads", "hidden_act") if k in config}


def clip_encoder(given: Any, name: str, bundle: SingleFile, repo: ComponentsRepo, required: bool) -> Any:
    """A CLIP text (``name="text_encoder"``) or vision (``"image_encoder"``) model: the given one, else the
    bundle's part, else the repo's."""
    if given is not None:
        return given
    part = bundle.parts.get(name)
    if part is None:
        return repo.load(name, required)
    tensors = normalize_clip_keys(part)
    if name == "text_encoder":
        width = tensors.get("text_model.embeddings.token_embedding.weight")
        build: Callable[..., Any] = clip_text_model
    else:
        width = tensors.get("vision_model.embeddings.class_embedding")
        build = clip_vision_model
    hints = repo.config_hints(name, None if width is None else width.shape[-1])
    source = f"{bundle.source} ({name} part)"
    return build(tensors, dtype=repo.options.dtype, source=source, **hints)


def prior_components(
    stage_c: str | Path,
    *,
    effnet: str | Path | EfficientNetEncoder | None,
    previewer: str | Path | Previewer | None,
    tokenizer: Any,
    text_encoder: Any,
    image_encoder: Any,
    feature_extractor: Any,
    components_repo: str | Path | None,
    options: LoadOptions,
) -> dict[str, Any]:
    """The constructor arguments of ``StableCascadePriorPipeline`` from a Stage C file or bundle."""
    file = SingleFile.read(stage_c, options)
    prior = unet(file, Kind.STAGE_C, "stage_c", options)
    repo = ComponentsRepo(components_repo, options)
    image_encoder = clip_encoder(image_encoder, "image_encoder", file, repo, required=False)
    if image_encoder is not None and feature_extractor is None:
        feature_extractor = repo.load("feature_extractor")
        if feature_extractor is None:
            feature_extractor = _clip_processor(image_encoder.config.image_size)
    return {
        "tokenizer": tokenizer if tokenizer is not None else repo.load("tokenizer", required=True),
        "text_encoder": clip_encoder(text_encoder, "text_encoder", file, repo, required=True),
        "prior": prior,
        "scheduler": repo.scheduler(),
        "feature_extractor": feature_extractor,
        "image_encoder": image_encoder,
        "effnet": auxiliary(effnet, Kind.EFFNET, "effnet", file, options),
        "previewer": auxiliary(previewer, Kind.PREVIEWER, "previewer", file, options),
    }


def _clip_processor(size: int) -> transformers.CLIPImageProcessor:
    """OpenAI CLIP's preprocessing (bicubic resize, centre crop, CLIP mean/std) at ``size``."""
    return transformers.CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    )


def decoder_components(
    stage_b: str | Path,
    stage_a: str | Path | PaellaVQModel | None,
    *,
    effnet: str | Path | EfficientNetEncoder | None,
    tokenizer: Any,
    text_encoder: Any,
    components_repo: str | Path | None,
    options: LoadOptions,
) -> dict[str, Any]:
    """The constructor arguments of ``StableCascadeDecoderPipeline`` from a Stage B file or bundle."""
    file = SingleFile.read(stage_b, options)
    decoder = unet(file, Kind.STAGE_B, "stage_b", options)
    vqgan = auxiliary(stage_a, Kind.STAGE_A, "stage_a", file, options)
    if vqgan is None:
        raise ValueError(
            f"{file.source} holds no Stage A (VQGAN): pass stage_a= a Stage A file (a path or "
            f"'{DECODER_REPO}/stage_a.safetensors') or a PaellaVQModel"
        )
    repo = ComponentsRepo(components_repo, options)
    return {
        "decoder": decoder,
        "tokenizer": tokenizer if tokenizer is not None else repo.load("tokenizer", required=True),
        "text_encoder": clip_encoder(text_encoder, "text_encoder", file, repo, required=True),
        "scheduler": repo.scheduler(),
        "vqgan": vqgan,
        "effnet": auxiliary(effnet, Kind.EFFNET, "effnet", file, options),
    }


def combined_components(
    stage_c: str | Path,
    stage_b: str | Path,
    stage_a: str | Path | PaellaVQModel | None,
    *,
    prior_options: Mapping[str, Any],
    decoder_tokenizer: Any,
    decoder_text_encoder: Any,
    components_repo: str | Path | None,
    options: LoadOptions,
) -> dict[str, Any]:
    """The constructor arguments of ``StableCascadeCombinedPipeline``: the prior's from
    :func:`prior_components` (``prior_options``: its keyword arguments), the decoder's with the prior's
    tokenizer and text encoder unless given (the released stages share one CLIP model)."""
    prior = prior_components(stage_c, components_repo=components_repo, options=options, **prior_options)
    decoder = decoder_components(
        stage_b,
        stage_a,
        effnet=prior["effnet"],
        tokenizer=decoder_tokenizer if decoder_tokenizer is not None else prior["tokenizer"],
        text_encoder=decoder_text_encoder if decoder_text_encoder is not None else prior["text_encoder"],
        components_repo=components_repo,
        options=options,
    )
    del decoder["effnet"]  # the combined pipeline gives its prior_effnet to the decoder
    return {**decoder, **{f"prior_{k}": v for k, v in prior.items()}}
