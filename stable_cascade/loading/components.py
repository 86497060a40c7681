"""``model_index.json`` and the components it names: reading it, loading and saving each component.

A pipeline directory (or Hub repo) holds ``model_index.json`` and one subfolder per component. The
index names each component as ``[library, class]`` (``[null, null]`` for an absent optional one),
as diffusers' ``DiffusionPipeline`` writes it; its other non-``_`` entries are constructor values.
Our model classes are written under diffusers' names so diffusers can read our directories.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers.models.auto.auto_factory import _BaseAutoModelClass

from stable_cascade.checkpoint import (
    CheckpointError,
    HubOptions,
    PretrainedConfigMixin,
    PretrainedModel,
    atomic,
    parse_dtype,
    read_json_object,
    resolve_file,
)
from stable_cascade.checkpoint.pretrained import DIFFUSERS_VERSION
from stable_cascade.checkpoint.safetensors_io import align_module
from stable_cascade.checkpoint.safety import check_transformers_folder
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.limits import check_transformers_config
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet

logger = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"

#: Our implementations of diffusers' classes, by diffusers class name.
OUR_CLASSES: dict[str, type[PretrainedConfigMixin]] = {
    cls.config_class.diffusers_class_name: cls
    for cls in (StableCascadeUNet, PaellaVQModel, DDPMWuerstchenScheduler)
}
#: Components diffusers never had (written as ``["stable_cascade", class]``).
EXTRA_CLASSES: dict[str, type[PretrainedConfigMixin]] = {
    cls.config_class.diffusers_class_name: cls for cls in (EfficientNetEncoder, Previewer, ControlNet)
}
#: Libraries an index may name for them; "wuerstchen" is how older diffusers wrote PaellaVQModel while it
#: was a class of the Würstchen pipeline module, so indexes written then may still say so.
OUR_LIBRARIES = frozenset({"diffusers", "stable_cascade", "wuerstchen"})


class PipelineConfig(Mapping[str, Any]):
    """A pipeline's config values, read-only, by key or attribute (``pipe.config.resolution_multiple``)."""

    def __init__(self, values: Mapping[str, Any]) -> None:
        self._values = dict(values)

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_") or name not in self._values:
            raise AttributeError(f"the pipeline config has no {name!r}; it has: {', '.join(self._values)}")
        return self._values[name]

    def __repr__(self) -> str:
        return f"PipelineConfig({self._values!r})"


def read_model_index(path_or_repo_id: str | Path, hub: HubOptions | None = None) -> dict[str, Any]:
    """The parsed ``model_index.json`` of a pipeline directory or Hub repo."""
    try:
        path = resolve_file(path_or_repo_id, MODEL_INDEX, hub=hub)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"no {MODEL_INDEX} for {str(path_or_repo_id)!r} ({error}); pass a pipeline folder (one with "
            f"{MODEL_INDEX} and a subfolder per component) or a Hub pipeline repo such as "
            "'stabilityai/stable-cascade-prior', not a single model's folder"
        ) from error
    return read_json_object(path)


def is_component_entry(value: Any) -> bool:
    """Whether an index value names a component: ``[library, class]`` or ``[null, null]``."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(v is None or isinstance(v, str) for v in value)
    )


def load_component(
    path_or_repo_id: str | Path,
    name: str,
    library: str,
    class_name: str,
    *,
    subfolder: str | None = None,
    torch_dtype: torch.dtype | str | None = None,
    variant: str | None = None,
    hub: HubOptions | None = None,
) -> Any:
    """Load component ``name``, declared ``[library, class_name]``, from ``subfolder`` (default: ``name``).

    As diffusers does, models get ``torch_dtype`` (float32 when not given) and ``variant``; tokenizers,
    processors and schedulers only the Hub options.
    """
    hub = hub or HubOptions()
    subfolder = subfolder or name
    _check_local_subfolder(path_or_repo_id, name, subfolder)
    logger.debug("loading %s (%s/%s) from %s/%s", name, library, class_name, path_or_repo_id, subfolder)
    ours = {**OUR_CLASSES, **EXTRA_CLASSES}
    if library in OUR_LIBRARIES and class_name in ours:
        cls = ours[class_name]
        options: dict[str, Any] = dataclasses.asdict(hub)  # revision, cache_dir, local_files_only, token
        if issubclass(cls, PretrainedModel):
            return cls.from_pretrained(
                path_or_repo_id, subfolder, variant=variant, torch_dtype=torch_dtype, **options
            )
        return cls.from_pretrained(path_or_repo_id, subfolder, **options)
    if library == "transformers":
        return _load_transformers(path_or_repo_id, name, class_name, subfolder, torch_dtype, variant, hub)
    supported = ", ".join(f"['diffusers', {cls!r}]" for cls in OUR_CLASSES)
    raise ValueError(
        f"component {name!r} is declared as [{library!r}, {class_name!r}] in {MODEL_INDEX}, which this "
        f"package cannot load; supported: {supported} and ['transformers', <class>]. Pass the component "
        f"yourself ({name}=...) or fix {MODEL_INDEX}"
    )


def _load_transformers(
    path_or_repo_id: str | Path,
    name: str,
    class_name: str,
    subfolder: str,
    torch_dtype: torch.dtype | str | None,
    variant: str | None,
    hub: HubOptions,
) -> Any:
    cls = getattr(transformers, class_name, None)
    if not isinstance(cls, type) or not hasattr(cls, "from_pretrained"):
        raise ValueError(
            f"component {name!r} is declared as ['transformers', {class_name!r}], but transformers "
            f"{transformers.__version__} has no loadable class of that name; pass the component yourself"
        )
    kwargs: dict[str, Any] = {
        "cache_dir": hub.cache_dir,
        "local_files_only": bool(hub.local_files_only),
        "token": hub.token,
    }
    if hub.revision is not None:
        kwargs["revision"] = hub.revision
    if is_transformers_model(cls):
        kwargs[_transformers_dtype_argument()] = parse_dtype(torch_dtype) or torch.float32
        if variant is not None:
            kwargs["variant"] = variant
    try:
        loaded = transformers_from_pretrained(cls, path_or_repo_id, name, subfolder, **kwargs)
    except OSError as error:  # transformers' message names neither the component nor the subfolder
        raise OSError(
            f"cannot load component {name!r} (transformers.{class_name}) from {path_or_repo_id}/{subfolder}: "
            f"{error}"
        ) from error
    if isinstance(loaded, torch.nn.Module):
        align_module(loaded)
    return loaded


def is_transformers_model(cls: type) -> bool:
    """Whether ``cls`` loads weights: a ``PreTrainedModel`` or an ``AutoModel…`` factory class."""
    return issubclass(cls, (transformers.PreTrainedModel, _BaseAutoModelClass))


def transformers_from_pretrained(
    cls: type, path_or_repo_id: str | Path, component: str, subfolder: str = "", **kwargs: Any
) -> Any:
    """``cls.from_pretrained`` that never unpickles and never runs a folder's code.

    A local folder is checked first (:func:`check_transformers_folder`); transformers then gets
    ``trust_remote_code=False`` (no "run the custom code?" prompt, no import of the folder's files)
    and, for model classes, ``use_safetensors=True``.
    """
    folder = Path(path_or_repo_id) / subfolder if subfolder else Path(path_or_repo_id)
    check_transformers_folder(folder, component)  # a local folder: its configs and index, no pickle
    kwargs["trust_remote_code"] = False
    if is_transformers_model(cls):
        kwargs["use_safetensors"] = True
        if not folder.is_dir():  # a Hub repo: its config.json is checked before transformers builds
            _check_hub_config(path_or_repo_id, subfolder, kwargs)
    loaded = cls.from_pretrained(str(path_or_repo_id), subfolder=subfolder, **kwargs)  # type: ignore[attr-defined]
    if isinstance(loaded, transformers.PreTrainedTokenizerBase):
        _check_tokenizer(loaded, folder, component)
    return loaded


def _check_hub_config(path_or_repo_id: str | Path, subfolder: str, kwargs: Mapping[str, Any]) -> None:
    hub = HubOptions(
        kwargs.get("revision"), kwargs.get("cache_dir"), kwargs.get("local_files_only"), kwargs.get("token")
    )
    try:
        path = resolve_file(path_or_repo_id, "config.json", subfolder or None, hub)
    except FileNotFoundError:
        return  # transformers says what is missing in its own words
    check_transformers_config(read_json_object(path), str(path))


def _check_tokenizer(tokenizer: Any, folder: Path, component: str) -> None:
    """A tokenizer with no vocabulary beyond its special tokens (its ``tokenizer.json`` or ``vocab.json``
    missing: transformers then builds an empty one) would turn every prompt into the same tokens."""
    if len(tokenizer) <= len(set(tokenizer.all_special_ids)):
        raise CheckpointError(
            f"{folder} (component {component!r}) holds no vocabulary: the tokenizer has only its "
            f"{len(tokenizer)} special tokens, so every prompt would encode alike; it needs tokenizer.json "
            "(or vocab.json and merges.txt)"
        )


def _transformers_dtype_argument() -> str:
    """transformers 4.56 renamed ``torch_dtype`` to ``dtype`` (the old name warns from then on)."""
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def _check_local_subfolder(path_or_repo_id: str | Path, name: str, subfolder: str) -> None:
    root = Path(path_or_repo_id)
    if not root.is_dir() or (root / subfolder).is_dir():
        return
    folders = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise FileNotFoundError(
        f"{root} has no folder {subfolder!r} for component {name!r} (it has {', '.join(folders) or 'none'}); "
        f"pass subfolders={{{name!r}: <folder>}} to load it from another folder, or {name}=<object>"
    )


def component_entry(component: Any) -> tuple[str, str]:
    """The ``[library, class]`` pair that ``model_index.json`` records for ``component``."""
    for cls in OUR_CLASSES.values():
        if isinstance(component, cls):
            return "diffusers", cls.config_class.diffusers_class_name
    for cls in EXTRA_CLASSES.values():
        if isinstance(component, cls):
            return "stable_cascade", cls.config_class.diffusers_class_name
    cls = type(component)
    if cls.__module__.split(".")[0] == "transformers" and hasattr(component, "save_pretrained"):
        return "transformers", _public_name(cls.__name__)
    raise TypeError(
        f"cannot save a component of type {cls.__module__}.{cls.__qualname__}: only "
        f"{', '.join(c.__name__ for c in (*OUR_CLASSES.values(), *EXTRA_CLASSES.values()))} and "
        "transformers models, tokenizers and "
        "processors can be saved in a pipeline directory"
    )


def _public_name(name: str) -> str:
    """A transformers class by the name every version knows: ``CLIPImageProcessorPil`` (what
    ``CLIPImageProcessor()`` makes without torchvision in transformers 5) is recorded as
    ``CLIPImageProcessor``, as its own ``preprocessor_config.json`` records it."""
    import transformers

    for suffix in ("Pil", "Fast"):
        base = name.removesuffix(suffix)
        if base != name and hasattr(transformers, base):
            return base
    return name


def save_component(
    component: Any, folder: Path, variant: str | None = None, max_shard_size: int | str | None = None
) -> None:
    """Write ``component`` to ``folder``; models name their weights with ``variant`` and split them into
    safetensors shards of at most ``max_shard_size`` (default: 10GB ours, transformers' own default)."""
    if isinstance(component, (PretrainedModel, transformers.PreTrainedModel)):
        shards: dict[str, Any] = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
        component.save_pretrained(folder, variant=variant, safe_serialization=True, **shards)
    else:
        component.save_pretrained(folder)


def write_model_index(directory: Path, class_name: str, entries: Mapping[str, Any]) -> None:
    """Write ``model_index.json``: the pipeline class, the diffusers version and ``entries``."""
    index = {"_class_name": class_name, "_diffusers_version": DIFFUSERS_VERSION, **entries}
    atomic.write_text(directory / MODEL_INDEX, json.dumps(index, indent=2, sort_keys=True) + "\n")
