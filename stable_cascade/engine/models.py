"""Loading what a job's :class:`~stable_cascade.loading.sources.ModelSources` name into pipelines, and
placing them on a device.

The EfficientNet encoder, the previewer and Stage A are fetched from the bundle's files only when a task
needs them and the loaded models lack them.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from stable_cascade.checkpoint import parse_dtype
from stable_cascade.convert import Kind, identify, split_bundle
from stable_cascade.loading.bundles import OFFLINE_HINT
from stable_cascade.loading.inspection import read_header
from stable_cascade.loading.single_file import LoadOptions, SingleFile, auxiliary
from stable_cascade.loading.sources import ModelSources, SourceKind, classify
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.combined import StableCascadeCombinedPipeline
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

logger = logging.getLogger(__name__)

Offload = Literal["none", "model", "sequential"]


@dataclasses.dataclass
class LoadedModels:
    """The loaded pipeline (combined, or the decoder alone) and the local files it came from."""

    pipeline: StableCascadeCombinedPipeline | StableCascadeDecoderPipeline
    local_files: dict[str, Path]

    @property
    def prior_pipe(self) -> StableCascadePriorPipeline | None:
        pipeline = self.pipeline
        return pipeline.prior_pipe if isinstance(pipeline, StableCascadeCombinedPipeline) else None

    @property
    def decoder_pipe(self) -> StableCascadeDecoderPipeline:
        pipeline = self.pipeline
        return pipeline.decoder_pipe if isinstance(pipeline, StableCascadeCombinedPipeline) else pipeline


def load_models(
    sources: ModelSources,
    *,
    torch_dtype: torch.dtype,
    prior: bool = True,
    effnet: bool = False,
    previewer: bool = False,
) -> LoadedModels:
    """Load the combined pipeline (or, with ``prior=False``, the decoder alone) that ``sources`` name.

    ``effnet`` / ``previewer``: the task needs the EfficientNet encoder / wants the previewer; when the
    loaded models lack them they come from the bundle's files (a missing previewer is only a warning).
    """
    check_components(sources, prior)
    loader = _Loader(sources, LoadOptions(dtype=torch_dtype))
    prior_pipe = loader.prior() if prior else None
    decoder_pipe = loader.decoder(prior_pipe)
    holder: StableCascadePriorPipeline | StableCascadeDecoderPipeline = prior_pipe or decoder_pipe
    if effnet and holder.effnet is None:
        holder.register_components(effnet=loader.part(sources.bundle.effnet, Kind.EFFNET, "effnet", True))
    if previewer and prior_pipe is not None and prior_pipe.previewer is None:
        try:
            prior_pipe.register_components(previewer=loader.part(sources.bundle.previewer, Kind.PREVIEWER))
        except OSError:
            logger.warning(
                "previews project the latent channels: %s is not available offline (pass --previewer FILE)",
                sources.bundle.previewer,
            )
    pipeline = decoder_pipe if prior_pipe is None else combine(prior_pipe, decoder_pipe)
    return LoadedModels(pipeline, loader.local_files)


def check_components(sources: ModelSources, prior: bool = True) -> None:
    """A ``ValueError`` when ``--components`` would do nothing: it serves single files and model folders
    (which lack a tokenizer and text encoder), and every stage to load is a pipeline (or bundle)."""
    if sources.components is None:
        return
    stages = [("--decoder", sources.decoder or sources.bundle.decoder_repo)]
    if prior:
        stages.insert(0, ("--prior", sources.prior or sources.bundle.prior_repo))
    if any(classify(spec, flag) in (SourceKind.FILE, SourceKind.MODEL) for flag, spec in stages):
        return
    raise ValueError(
        f"--components {sources.components} would do nothing: it gives the tokenizer and text encoder to "
        "single files and model folders (--prior/--decoder), and these models bring their own; drop it"
    )


def combine(
    prior: StableCascadePriorPipeline, decoder: StableCascadeDecoderPipeline
) -> StableCascadeCombinedPipeline:
    """One combined pipeline of the two; the EfficientNet encoder of either serves both."""
    parts = {k: v for k, v in decoder.components.items() if k != "effnet"}
    parts.update({f"prior_{k}": v for k, v in prior.components.items()})
    if parts.get("prior_effnet") is None:
        parts["prior_effnet"] = decoder.effnet
    return StableCascadeCombinedPipeline(**parts)


#: The parts a bundle may hold as model folders.
_FOLDER_PARTS: dict[Kind, Any] = {Kind.EFFNET: EfficientNetEncoder, Kind.STAGE_A: PaellaVQModel}


class _Loader:
    def __init__(self, sources: ModelSources, options: LoadOptions) -> None:
        self.sources = sources
        self.options = options
        self.local_files: dict[str, Path] = {}

    def part(self, spec: str, kind: Kind, role: str = "", from_bundle: bool = False) -> nn.Module:
        """Stage A, the EfficientNet encoder or the previewer from a single file (or, from a bundle,
        a model folder: the demo's Stage A and EfficientNet encoder are folders)."""
        argument = f"--{role.replace('_', '-')}" if role else kind.value
        source = classify(spec, argument)
        if source is SourceKind.MODEL and from_bundle and kind in _FOLDER_PARTS:
            self._note(role, spec)
            return _FOLDER_PARTS[kind].from_pretrained(spec, torch_dtype=self.options.dtype)
        if source is not SourceKind.FILE:
            raise ValueError(f"{argument} takes a single checkpoint file; {spec} is a folder or repo")
        self._note(role, spec)
        try:
            return auxiliary(spec, kind, argument, SingleFile(spec, {}, {}), self.options)
        except OSError as error:
            if from_bundle:
                raise FileNotFoundError(
                    f"cannot load {spec}: it is not in the local Hugging Face cache and could not be "
                    f"downloaded; {OFFLINE_HINT}"
                ) from error
            raise

    def prior(self) -> StableCascadePriorPipeline:
        sources, bundle = self.sources, self.sources.bundle
        spec = sources.prior or bundle.prior_repo
        extras: dict[str, Any] = {
            name: self.part(value, kind, name)
            for name, value, kind in (
                ("effnet", sources.effnet, Kind.EFFNET),
                ("previewer", sources.previewer, Kind.PREVIEWER),
            )
            if value is not None
        }
        kind = classify(spec, "--prior")
        self._note("prior", spec)
        if kind is SourceKind.FILE:
            return StableCascadePriorPipeline.from_single_file(
                spec,
                components_repo=self._components(self.sources.bundle.prior_repo),
                torch_dtype=self.options.dtype,
                **extras,
            )
        if kind is SourceKind.MODEL:
            unet = self._unet(spec, stage_b=False)
            return self._pretrained(
                StableCascadePriorPipeline,
                self._components(self.sources.bundle.prior_repo),
                prior=unet,
                **extras,
            )
        subfolders = {} if sources.prior else {"prior": bundle.prior_subfolder}
        if kind is SourceKind.PIPELINE:
            self.local_files["prior"] = Path(spec) / subfolders.get("prior", "prior")
        return self._pretrained(
            StableCascadePriorPipeline, spec, subfolders=subfolders, from_bundle=not sources.prior, **extras
        )

    def decoder(self, prior: StableCascadePriorPipeline | None) -> StableCascadeDecoderPipeline:
        sources, bundle = self.sources, self.sources.bundle
        spec = sources.decoder or bundle.decoder_repo
        kind = classify(spec, "--decoder")
        self._note("decoder", spec)
        # The prior's text encoder serves Stage B too (one CLIP model; the combined pipeline hands on
        # the prior's embeddings), so it is not loaded twice.
        extras: dict[str, Any] = {}
        if prior is not None:
            extras = {"tokenizer": prior.tokenizer, "text_encoder": prior.text_encoder}
        elif sources.effnet is not None:  # with a prior, the prior holds it
            extras["effnet"] = self.part(sources.effnet, Kind.EFFNET, "effnet")
        stage_a: Any = self.part(sources.stage_a, Kind.STAGE_A, "stage_a") if sources.stage_a else None
        if kind is SourceKind.FILE:
            if stage_a is None and not _bundles_stage_a(spec):
                stage_a = self.part(bundle.stage_a, Kind.STAGE_A, from_bundle=True)
            return StableCascadeDecoderPipeline.from_single_file(
                spec,
                stage_a,
                components_repo=self._components(bundle.decoder_repo),
                torch_dtype=self.options.dtype,
                **extras,
            )
        if stage_a is not None:
            extras["vqgan"] = stage_a
        if kind is SourceKind.MODEL:
            unet = self._unet(spec, stage_b=True)
            repo = self._components(bundle.decoder_repo)
            return self._pretrained(StableCascadeDecoderPipeline, repo, decoder=unet, **extras)
        subfolders = {} if sources.decoder else {"decoder": bundle.decoder_subfolder}
        if kind is SourceKind.PIPELINE:
            self.local_files["decoder"] = Path(spec) / subfolders.get("decoder", "decoder")
        return self._pretrained(
            StableCascadeDecoderPipeline,
            spec,
            subfolders=subfolders,
            from_bundle=not sources.decoder,
            **extras,
        )

    def _pretrained(
        self,
        cls: type[Any],
        spec: str,
        *,
        subfolders: Mapping[str, str] | None = None,
        from_bundle: bool = False,
        **components: Any,
    ) -> Any:
        try:
            return cls.from_pretrained(
                spec, torch_dtype=self.options.dtype, subfolders=subfolders, **components
            )
        except OSError as error:
            if not from_bundle:
                raise
            bundle = self.sources.bundle
            raise FileNotFoundError(
                f"cannot load the {bundle.name!r} model ({bundle.prior_repo} + {bundle.decoder_repo}): it is "
                f"not in the local Hugging Face cache and could not be downloaded; {OFFLINE_HINT}"
            ) from error

    def _unet(self, folder: str, stage_b: bool) -> StableCascadeUNet:
        unet = StableCascadeUNet.from_pretrained(folder, torch_dtype=self.options.dtype)
        if unet.config.is_stage_b != stage_b:
            found, option = ("Stage B", "--decoder") if unet.config.is_stage_b else ("Stage C", "--prior")
            raise ValueError(f"{folder} holds a {found} UNet; pass it as {option}")
        return unet

    def _components(self, default: str) -> str:
        return default if self.sources.components is None else self.sources.components

    def _note(self, role: str, spec: str) -> None:
        if role and Path(spec).exists():
            self.local_files[role] = Path(spec)


def _bundles_stage_a(spec: str) -> bool:
    """Whether a local Stage B file is a ComfyUI bundle with a Stage A part (read from its header)."""
    if not Path(spec).is_file():
        return False
    shapes = read_header(spec).shapes
    return identify(shapes).kind is Kind.COMFY_BUNDLE and "stage_a" in split_bundle(shapes)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA when available, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r} ({error}); use auto, cpu, cuda or cuda:N") from error
    if device.type == "meta":
        raise ValueError("device 'meta' holds no data and cannot generate; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for, but CUDA is not available; use the CPU")
    count = torch.cuda.device_count() if device.type == "cuda" else 0
    if device.type == "cuda" and device.index is not None and device.index >= count:
        raise ValueError(
            f"device {name!r} asked for, but there are {count} CUDA devices: cuda:0 … cuda:{count - 1}"
        )
    if device.type not in ("cpu", "cuda", "mps", "xpu"):
        raise ValueError(f"device {name!r} cannot run the models here; use auto, cpu, cuda or cuda:N")
    if device.type in ("mps", "xpu") and not _available(device.type):
        raise ValueError(f"device {name!r} asked for, but {device.type} is not available here; use the CPU")
    return device


def _available(backend: str) -> bool:
    """Whether torch can run on ``mps`` (Apple GPUs) or ``xpu`` (Intel GPUs) here."""
    if backend == "mps":
        return bool(torch.backends.mps.is_available())
    module = getattr(torch, backend, None)
    return bool(module is not None and module.is_available())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"``: bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    dtype = parse_dtype(name)
    assert dtype is not None
    return dtype


def place(
    pipeline: StableCascadeCombinedPipeline | StableCascadeDecoderPipeline,
    device: torch.device,
    offload: Offload,
) -> None:
    """Move the models to ``device``, or keep them on the CPU and offload per model or per module."""
    if offload == "none":
        pipeline.to(device)
    elif offload == "model":
        pipeline.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipeline.enable_sequential_cpu_offload(device=device)
    else:
        raise ValueError(f"unknown offload {offload!r}; use none, model or sequential")
