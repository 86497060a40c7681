"""``from_pretrained`` / ``save_pretrained`` in the diffusers directory layout.

A model directory holds ``config.json`` and ``diffusion_pytorch_model[.variant].safetensors`` (or
shards plus ``diffusion_pytorch_model.safetensors.index[.variant].json``); a scheduler directory
holds ``scheduler_config.json``. Models are built on the ``meta`` device and the checkpoint's
tensors are assigned after a strict check of every key and shape.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from stable_cascade.checkpoint.atomic import write_text
from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.files import HubOptions, resolve_file, resolve_weights
from stable_cascade.checkpoint.hub import check_safe_serialization, save_and_upload, upload_folder
from stable_cascade.checkpoint.jsonio import read_json_object
from stable_cascade.checkpoint.safetensors_io import read_single_file, read_state_dict, write_state_dict
from stable_cascade.specs import ConfigBase

#: Written into config files so that diffusers can read our directories too.
DIFFUSERS_VERSION = "0.35.2"

#: ``push_to_hub`` options that go to ``save_pretrained`` rather than to the upload.
_SAVE_OPTIONS = ("variant", "max_shard_size", "safe_serialization")

M = TypeVar("M", bound="PretrainedModel")
S = TypeVar("S", bound="PretrainedConfigMixin")

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def parse_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    """A floating ``torch.dtype`` from a dtype or one of its common names."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(_DTYPES)} or a torch.dtype")
        return _DTYPES[name]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"torch_dtype must be a floating torch.dtype such as torch.bfloat16, got {dtype!r}")
    return dtype


def pick_dtype(torch_dtype: Any, dtype: Any) -> Any:
    """``dtype`` is diffusers' new name of ``torch_dtype``: either may be given, not two different ones."""
    if dtype is None:
        return torch_dtype
    if torch_dtype is not None and torch_dtype != dtype:
        raise TypeError(f"got torch_dtype={torch_dtype!r} and dtype={dtype!r}; pass only dtype")
    return dtype


def read_config(path: Path, expected_class: str, our_class: str) -> dict[str, Any]:
    """A config file's dict, after checking it describes the expected class."""
    data = read_json_object(path)
    found = data.get("_class_name")
    if found is not None and found not in (expected_class, our_class):
        raise CheckpointError(
            f"{path} describes a {found}, not a {our_class}; load it with the class for {found} "
            "or point to the right subfolder"
        )
    return data


def write_config(config: ConfigBase, path: Path) -> None:
    data = {
        "_class_name": config.diffusers_class_name,
        "_diffusers_version": DIFFUSERS_VERSION,
        **config.to_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


class PretrainedConfigMixin:
    """Loading and saving of objects fully described by a config (schedulers)."""

    config_class: ClassVar[type[ConfigBase]]
    config_name: ClassVar[str] = "config.json"
    config: ConfigBase

    @classmethod
    def resolve_config(cls, config: ConfigBase | Mapping[str, Any] | None, changes: Mapping[str, Any]) -> Any:
        """The config a constructor ``Cls(config=None, **changes)`` describes (diffusers-style kwargs)."""
        if config is None:
            config = cls.config_class()
        elif isinstance(config, Mapping):
            config = cls.config_class.from_dict(config)
        elif not isinstance(config, cls.config_class):
            raise TypeError(
                f"{cls.__name__} takes a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        return config.replace(**changes)

    @classmethod
    def from_config(cls: type[S], config: ConfigBase | Mapping[str, Any] | None = None, **changes: Any) -> S:
        return cls(cls.resolve_config(config, changes))  # type: ignore[call-arg]

    @classmethod
    def _load_config(
        cls, path_or_repo_id: str | Path, subfolder: str | None, hub: HubOptions
    ) -> tuple[ConfigBase, Path]:
        path = resolve_file(path_or_repo_id, cls.config_name, subfolder, hub)
        data = read_config(path, cls.config_class.diffusers_class_name, cls.__name__)
        return cls.config_class.from_dict(data, source=str(path)), path

    @classmethod
    def from_pretrained(
        cls: type[S],
        path_or_repo_id: str | Path,
        subfolder: str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
    ) -> S:
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        config, _ = cls._load_config(path_or_repo_id, subfolder, hub)
        return cls(config)  # type: ignore[call-arg]

    def save_pretrained(self, directory: str | Path, push_to_hub: bool = False, **hub_options: Any) -> None:
        """Write the config file; ``push_to_hub=True`` then uploads the folder (``repo_id=``, ``token=``…)."""
        write_config(self.config, Path(directory) / self.config_name)
        if push_to_hub:
            upload_folder(Path(directory), hub_options.pop("repo_id", Path(directory).name), **hub_options)

    def push_to_hub(self, repo_id: str, **options: Any) -> Any:
        """Save to a temporary folder and upload it to ``repo_id`` (``commit_message``, ``private``,
        ``token``, ``create_pr``; ``variant`` and ``max_shard_size`` for models), as diffusers does."""
        saving = {k: options.pop(k) for k in _SAVE_OPTIONS if k in options}
        return save_and_upload(lambda folder: self.save_pretrained(folder, **saving), repo_id, **options)


class PretrainedModel(nn.Module, PretrainedConfigMixin):
    """An ``nn.Module`` whose constructor takes its config; adds weights to the config round trip."""

    weights_stem: ClassVar[str] = "diffusion_pytorch_model"

    @classmethod
    def from_pretrained(  # type: ignore[override]
        cls: type[M],
        path_or_repo_id: str | Path,
        subfolder: str | None = None,
        *,
        variant: str | None = None,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool | None = None,
        token: str | bool | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> M:
        """Load a diffusers-layout model directory or Hub repo (``subfolder`` e.g. ``"prior"``).

        As in diffusers, weights are cast to ``dtype`` (alias ``torch_dtype``; float32 when not given).
        """
        dtype = parse_dtype(pick_dtype(torch_dtype, dtype)) or torch.float32
        hub = HubOptions(revision, cache_dir, local_files_only, token)
        config, _ = cls._load_config(path_or_repo_id, subfolder, hub)
        files = resolve_weights(path_or_repo_id, cls.weights_stem, subfolder, variant, hub)
        state_dict = read_state_dict(files, device=device or "cpu")
        source = str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} shards)"
        return cls.from_state_dict(config, state_dict, source=source, dtype=dtype, copy=False)

    @classmethod
    def from_single_file(
        cls: type[M],
        path: str | Path,
        *,
        torch_dtype: torch.dtype | str | None = None,
        device: str | torch.device | None = None,
        allow_pickle: bool = False,
    ) -> M:
        """Load an original (Stability / ComfyUI-style) single checkpoint file.

        The architecture comes from the tensors alone (:meth:`config_from_single_file`), the keys are
        mapped to ours (:meth:`convert_single_file`); pickle files need ``allow_pickle=True``.
        """
        dtype = parse_dtype(torch_dtype) or torch.float32
        state_dict = read_single_file(path, allow_pickle)
        config = cls.config_from_single_file(state_dict, source=str(path))
        converted = cls.convert_single_file(state_dict)
        model = cls.from_state_dict(config, converted, source=str(path), dtype=dtype, copy=False)
        return model.to(device) if device is not None else model

    @classmethod
    def config_from_single_file(cls, state_dict: Mapping[str, torch.Tensor], source: str) -> ConfigBase:
        """The config that fits an original checkpoint (default: the class's default config)."""
        return cls.config_class()

    @classmethod
    def convert_single_file(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Original keys → ours (default: unchanged)."""
        return state_dict

    @classmethod
    def from_state_dict(
        cls: type[M],
        config: ConfigBase | Mapping[str, Any],
        state_dict: Mapping[str, torch.Tensor],
        source: str = "state dict",
        dtype: torch.dtype | None = None,
        copy: bool = True,
    ) -> M:
        """Build on the meta device and take the tensors of ``state_dict`` after a strict check.

        With ``copy=False`` the model adopts the given tensors (no second copy in memory; used by
        ``from_pretrained`` for tensors it just read), so later in-place updates would reach them.
        """
        with torch.device("meta"):
            model = cls(cls.resolve_config(config, {}))  # type: ignore[call-arg]
        check_state_dict(model, state_dict, source)
        if copy:
            state_dict = {k: v.detach().clone() for k, v in state_dict.items()}
        model.load_state_dict(state_dict, strict=True, assign=True)
        # Every tensor must come from the checkpoint: a non-persistent buffer would still be on meta.
        assert not any(t.is_meta for t in (*model.parameters(), *model.buffers())), "unloaded meta tensor"
        if dtype is not None:
            model.to(dtype=dtype)
        return model.eval()

    def save_pretrained(  # type: ignore[override]
        self,
        directory: str | Path,
        variant: str | None = None,
        max_shard_size: int | str | None = None,
        safe_serialization: bool = True,
        push_to_hub: bool = False,
        **hub_options: Any,
    ) -> None:
        """Write ``config.json`` and the weights (safetensors, shards above ``max_shard_size``, default
        10GB) in the diffusers layout; ``push_to_hub=True`` then uploads the folder, as in diffusers."""
        check_safe_serialization(safe_serialization)
        write_config(self.config, Path(directory) / self.config_name)
        write_state_dict(self.state_dict(), directory, self.weights_stem, variant, max_shard_size or "10GB")
        if push_to_hub:
            upload_folder(Path(directory), hub_options.pop("repo_id", Path(directory).name), **hub_options)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise a ``CheckpointError`` listing missing, unexpected and wrongly shaped tensors."""
    expected = model.state_dict()
    missing = sorted(expected.keys() - state_dict.keys())
    unexpected = sorted(state_dict.keys() - expected.keys())
    mismatched = [
        f"{k}: checkpoint {tuple(state_dict[k].shape)}, model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    if not (missing or unexpected or mismatched):
        _check_floating(expected, state_dict, source)
        return
    parts = [f"{source} does not fit {type(model).__name__} with this config:"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = "\n    ".join(items[:10])
            more = f"\n    ... and {len(items) - 10} more" if len(items) > 10 else ""
            parts.append(f"  {len(items)} {title}:\n    {shown}{more}")
    parts.append("Is this a checkpoint of another model or variant? Check the path, subfolder and config.")
    raise CheckpointError("\n".join(parts))


def _check_floating(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor], source: str
) -> None:
    """Floating-point weights where the model has them: an integer tensor (a corrupted or foreign file)
    would otherwise be cast silently or fail inside ``load_state_dict``."""
    for key, tensor in state_dict.items():
        if expected[key].is_floating_point() and not tensor.is_floating_point():
            raise CheckpointError(
                f"{source}: tensor {key} is {tensor.dtype}, but model weights must be floating point "
                "(float32, float16, bfloat16 or float8); the file is corrupted or not this model's checkpoint"
            )
