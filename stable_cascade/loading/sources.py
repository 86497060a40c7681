"""Where the models come from: a run's model options (:class:`ModelSources`) and what a spec names.

A spec is a Hub repo id (``stabilityai/stable-cascade-prior``), a local pipeline folder (with
``model_index.json``), a local model folder (``config.json``: the UNet alone, the other components
come from the components repo), or a single file: an original Stability checkpoint or a ComfyUI
bundle, local or on the Hub as ``owner/repo/file.safetensors``. What no spec names comes from the
bundle (default ``full``). :mod:`stable_cascade.engine.models` loads them into pipelines.
"""

from __future__ import annotations

import dataclasses
import enum
import re
from pathlib import Path

from stable_cascade.loading.bundles import DEFAULT_BUNDLE, ModelBundle, get_bundle
from stable_cascade.loading.components import MODEL_INDEX
from stable_cascade.loading.inspection import PICKLE_SUFFIXES

_REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


class SourceKind(enum.Enum):
    HUB = "Hub repo"
    PIPELINE = "pipeline folder"
    MODEL = "model folder"
    FILE = "single file"


def classify(spec: str, argument: str) -> SourceKind:
    """What a spec names; a ``FileNotFoundError`` / ``ValueError`` naming ``argument`` when nothing fits."""
    path = Path(spec)
    if path.suffix in PICKLE_SUFFIXES:
        raise ValueError(
            f"{argument} {spec} is a pickle file, which can run arbitrary code; only .safetensors files are "
            "read: convert it with a tool you trust"
        )
    if path.is_file():
        return SourceKind.FILE
    if path.is_dir():
        if (path / MODEL_INDEX).is_file():
            return SourceKind.PIPELINE
        if (path / "config.json").is_file():
            return SourceKind.MODEL
        raise ValueError(
            f"{argument} {spec} is a folder without {MODEL_INDEX} or config.json: pass a diffusers "
            "pipeline or model folder, or a checkpoint file"
        )
    if _REPO_ID.match(spec) and not spec.startswith("."):
        return SourceKind.HUB
    if spec.endswith(".safetensors") and spec.count("/") >= 2 and not path.is_absolute():
        return SourceKind.FILE  # owner/repo/[folder/]file.safetensors on the Hub
    raise FileNotFoundError(f"{argument} {spec} does not exist (neither a file, a folder nor a Hub repo id)")


@dataclasses.dataclass(frozen=True)
class ModelSources:
    """The model options of a run; None: from the bundle ``model`` (default ``full``)."""

    model: str | None = None
    prior: str | None = None
    decoder: str | None = None
    stage_a: str | None = None
    effnet: str | None = None
    previewer: str | None = None
    components: str | None = None

    @property
    def bundle(self) -> ModelBundle:
        return get_bundle(self.model or DEFAULT_BUNDLE)
