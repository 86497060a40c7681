"""A models folder (``serve --models DIR``): checkpoints, LoRAs and ControlNets offered by name.

The layout, as AUTOMATIC1111 and ComfyUI users keep theirs (either folder name works)::

    DIR/checkpoints/   (or Stable-diffusion/)  Stage C checkpoints, each one of:
        NAME/prior/ + NAME/decoder/    a prior and a decoder pipeline folder (a whole cascade)
        NAME/  with model_index.json   a prior pipeline folder
        NAME/  with config.json        a Stage C model folder (the UNet)
        NAME.safetensors               an original Stage C single file, or a ComfyUI bundle
    DIR/loras/         (or Lora/)                 Stage C LoRAs: NAME.safetensors (subfolders too)
    DIR/controlnet/    (or ControlNet/)           ControlNets: NAME.safetensors, or NAME/ with config.json

A checkpoint's name is its file's stem or its folder's name. What a checkpoint lacks comes from the
named model of its size (its base): the demo's when its Stage C is the demo's shape, else lite or
full by its width. Names are read once, and again on :meth:`ModelLibrary.refresh`; an entry that is
not what its folder holds is left out, with a warning. Requests name entries; a job holds their paths.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable
from pathlib import Path

import huggingface_hub

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert import Kind, identify, split_bundle
from stable_cascade.loading.bundles import BUNDLES, ModelBundle
from stable_cascade.loading.components import MODEL_INDEX
from stable_cascade.loading.inspection import read_header
from stable_cascade.loading.sources import ModelSources
from stable_cascade.specs import UNET_VARIANTS

logger = logging.getLogger(__name__)
#: The kinds of entries and the folder names each may have.
FOLDERS = {
    "checkpoints": ("checkpoints", "Stable-diffusion"),
    "loras": ("loras", "Lora", "LyCORIS"),
    "controlnets": ("controlnet", "ControlNet"),
}
_LITE_WIDTH = UNET_VARIANTS["prior_lite"].block_out_channels[0]


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint of the folder: its name, file or folder, and the models it stands for."""

    name: str
    path: Path
    sources: ModelSources  # model: its base; prior (and decoder, components) in the folder

    @property
    def base(self) -> ModelBundle:
        return self.sources.bundle


class ModelLibrary:
    """The entries of a models folder (none without one); see the module's docstring."""

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = None if folder is None else Path(folder).resolve()
        self.checkpoints: dict[str, Checkpoint] = {}
        self.loras: dict[str, Path] = {}
        self.controlnets: dict[str, Path] = {}
        if self.folder is not None and not self.folder.is_dir():
            raise ValueError(f"the models folder {folder} does not exist; create it or give another --models")
        self.refresh()

    def refresh(self) -> None:
        """Read the folder's entries again."""
        checkpoints: dict[str, Checkpoint] = {}
        for path in self._entries("checkpoints", folders=True):
            name = path.stem if path.is_file() else path.name
            if name in BUNDLES or name in checkpoints:
                logger.warning("models folder: %s is left out: the name %s is taken", path, name)
                continue
            sources = _checkpoint_sources(path)
            if sources is not None:
                checkpoints[name] = Checkpoint(name, path, sources)
        self.checkpoints = checkpoints
        self.loras = _named(p for p in self._entries("loras") if p.is_file())
        self.controlnets = _named(
            p
            for p in self._entries("controlnets", folders=True)
            if p.is_file() or (p / "config.json").is_file()
        )

    def sources(self, name: str) -> ModelSources:
        """The models a name stands for: a named model (``demo``) or a checkpoint of the folder."""
        if name in BUNDLES:
            return ModelSources(model=name)
        if name in self.checkpoints:
            return self.checkpoints[name].sources
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(self.model_names())}")

    def model_names(self) -> list[str]:
        return [*BUNDLES, *self.checkpoints]

    def name_of(self, sources: ModelSources) -> str | None:
        """The name of the models ``sources`` stand for (None: not a named model nor a checkpoint)."""
        if sources == ModelSources(model=sources.model):
            return sources.model
        return next((c.name for c in self.checkpoints.values() if c.sources == sources), None)

    def lora(self, name: str) -> Path:
        if name not in self.loras:
            offered = ", ".join(self.loras) or "none: the server's models folder has no loras/"
            raise ValueError(f"unknown LoRA {name!r}; expected one of {offered}")
        return self.loras[name]

    def lora_name(self, path: str) -> str | None:
        """The name of the LoRA at ``path`` (a job's: links resolved), None when it is not one of these."""
        return next((name for name, p in self.loras.items() if str(p.resolve()) == path), None)

    def controlnet_name(self, path: str) -> str | None:
        """The name of the ControlNet at ``path`` (a job's), None when it is not one of these."""
        return next((name for name, p in self.controlnets.items() if str(p.resolve()) == path), None)

    def controlnet(self, name: str) -> Path:
        if name not in self.controlnets:
            raise ValueError(f"unknown ControlNet {name!r}; expected one of {', '.join(self.controlnets)}")
        return self.controlnets[name]

    def relative(self, path: Path) -> str:
        """``path`` as it shows to clients: within the models folder."""
        assert self.folder is not None, "entries come from a models folder"
        return str(path.relative_to(self.folder))

    def _entries(self, kind: str, folders: bool = False) -> list[Path]:
        """The ``.safetensors`` files (and, with ``folders``, the folders) of a kind's folders, sorted."""
        if self.folder is None:
            return []
        found: list[Path] = []
        for name in FOLDERS[kind]:
            root = self.folder / name
            if not root.is_dir():
                continue
            if folders:
                found += sorted(p for p in root.iterdir() if p.is_dir() or p.suffix == ".safetensors")
            else:
                found += sorted(p for p in root.rglob("*.safetensors") if p.is_file())
        return found


def available(sources: ModelSources) -> bool:
    """Whether the models ``sources`` name are here: local files, or the Hub repos in the local cache."""
    bundle = sources.bundle
    for spec in (sources.prior or bundle.prior_repo, sources.decoder or bundle.decoder_repo):
        if Path(spec).exists():
            continue
        cached = huggingface_hub.try_to_load_from_cache(spec, MODEL_INDEX)
        if not isinstance(cached, str):
            return False
    return True


def _named(paths: Iterable[Path]) -> dict[str, Path]:
    """Entries by name (file stem or folder name); a repeated name keeps the first, with a warning."""
    named: dict[str, Path] = {}
    for path in paths:
        name = path.stem if path.is_file() else path.name
        if name in named:
            logger.warning("models folder: %s is left out: %s has the name %s", path, named[name], name)
        else:
            named[name] = path
    return named


def _checkpoint_sources(path: Path) -> ModelSources | None:
    """The models of one entry of checkpoints/ (None, with a warning, when it is not a checkpoint)."""
    try:
        return _sources(path.resolve())
    except (CheckpointError, OSError, ValueError, KeyError, TypeError) as error:
        logger.warning("models folder: %s is left out: %s", path, " ".join(str(error).split()))
        return None


def _sources(path: Path) -> ModelSources:
    if path.is_file():
        shapes = read_header(path).shapes
        identity = identify(shapes)
        if identity.kind is Kind.COMFY_BUNDLE:
            parts = {part: identify(tensors) for part, tensors in split_bundle(shapes).items()}
            unet = parts.get("unet")
            if unet is None or unet.kind not in (Kind.STAGE_C, Kind.STAGE_B):
                raise ValueError("a ComfyUI bundle without a Stage C or Stage B")
            stage = "prior" if unet.kind is Kind.STAGE_C else "decoder"
            if stage == "decoder":
                raise ValueError("a Stage B bundle is a decoder, not a checkpoint of Stage C")
            return _based(_config(unet.config), components=True, prior=str(path))
        if identity.kind is not Kind.STAGE_C:
            raise ValueError(f"{identity.kind.article} {identity.kind.value} file, not a Stage C checkpoint")
        return _based(_config(identity.config), components=True, prior=str(path))
    if (path / "prior" / MODEL_INDEX).is_file() and (path / "decoder" / MODEL_INDEX).is_file():
        config = _json(path / "prior" / "prior" / "config.json")
        return _based(config, prior=str(path / "prior"), decoder=str(path / "decoder"))
    if (path / MODEL_INDEX).is_file():
        kind = _json(path / MODEL_INDEX).get("_class_name")
        if kind != "StableCascadePriorPipeline":
            raise ValueError(f"a {kind} folder; a checkpoint is a prior pipeline (or a prior/ and decoder/)")
        return _based(_json(path / "prior" / "config.json"), prior=str(path))
    if (path / "config.json").is_file():
        config = _json(path / "config.json")
        if config.get("effnet_in_channels"):
            raise ValueError("a Stage B model folder, not a checkpoint of Stage C")
        return _based(config, prior=str(path), components=True)
    raise ValueError("neither a .safetensors file nor a pipeline or model folder")


def _based(config: dict[str, object], components: bool = False, **paths: str) -> ModelSources:
    """Sources on the base bundle that fits a Stage C of this config; ``components``: the Stage C needs
    a tokenizer and text encoder (a single file, a model folder), the base's when it is local."""
    base = _base(config)
    extra = {"components": base.prior_repo} if components and Path(base.prior_repo).exists() else {}
    return ModelSources(model=base.name, **paths, **extra)


def _base(config: dict[str, object]) -> ModelBundle:
    """The bundle with a local Stage C of the same text width (the demo), else lite or full by the
    Stage C's width (a shape that cannot be read: full)."""
    for bundle in BUNDLES.values():
        local = Path(bundle.prior_repo) / bundle.prior_subfolder / "config.json"
        text = config.get("clip_text_in_channels")
        if text is not None and local.is_file() and _json(local).get("clip_text_in_channels") == text:
            return bundle
    widths = config.get("block_out_channels")
    width = widths[0] if isinstance(widths, (list, tuple)) and widths else None
    return BUNDLES["lite" if width == _LITE_WIDTH else "full"]


def _config(config: object) -> dict[str, object]:
    """An inferred UNet config as a config.json holds it (``{}`` when the shapes did not tell)."""
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else {}  # type: ignore[arg-type]


def _json(path: Path) -> dict[str, object]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data
