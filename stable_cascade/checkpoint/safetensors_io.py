"""Reading and writing state dicts as safetensors, with errors that name the file at fault."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stable_cascade.checkpoint.atomic import atomic_path, write_text
from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.files import weights_filenames

_PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


_ALIGNMENT = 64  # bytes: what torch's CPU allocator gives every tensor


def aligned(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor``, copied when its data does not start on a 64-byte boundary.

    safetensors hands out views at any byte offset of a file; CPU kernels take other code paths on
    misaligned rows, so a loaded model's results would differ in the last bits from those of the
    same weights allocated in memory. A copy is aligned like every fresh allocation.
    """
    return tensor if tensor.data_ptr() % _ALIGNMENT == 0 else tensor.clone()


def align_module(module: torch.nn.Module) -> None:
    """Give every misaligned parameter and buffer of ``module`` aligned memory (see :func:`aligned`)."""
    with torch.no_grad():
        for tensor in (*module.parameters(), *module.buffers()):
            if tensor.device.type == "cpu" and tensor.data_ptr() % _ALIGNMENT:
                tensor.data = tensor.data.clone()


def read_state_dict(
    files: Sequence[str | Path], device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """All tensors of one or more safetensors files (the shards of one checkpoint)."""
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        path = Path(file)
        if path.suffix in _PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{path} is a pickle file, which can run arbitrary code and is never loaded; "
                "use a .safetensors checkpoint instead"
            )
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint file {path} does not exist")
        try:
            tensors = load_file(path, device=str(device))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(
                f"{path} is not a readable safetensors file ({error}); it may be truncated or corrupted: "
                "download it again"
            ) from error
        tensors = {k: aligned(v) for k, v in tensors.items()}
        duplicated = state_dict.keys() & tensors.keys()
        if duplicated:
            raise CheckpointError(f"{path} repeats tensors of another shard: {sorted(duplicated)[:5]}")
        state_dict.update(tensors)
    return state_dict


def read_single_file(path: str | Path, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file: safetensors, or a pickle file only with ``allow_pickle``.

    Pickle files are read with ``torch.load(weights_only=True)``, which refuses arbitrary objects;
    still, only allow them for files you trust.
    """
    path = Path(path)
    if path.suffix not in _PICKLE_SUFFIXES:
        return read_state_dict([path])
    if not allow_pickle:
        raise CheckpointError(
            f"{path} is a pickle file, which can run arbitrary code and is not loaded by default; "
            "use a .safetensors file, or pass allow_pickle=True if you trust its source"
        )
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint file {path} does not exist")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {error}") from error
    loaded = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return dict(loaded)


def save_tensors_file(
    tensors: Mapping[str, torch.Tensor], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` (contiguous CPU or device tensors) to the safetensors file ``path`` atomically: a
    full disk leaves the old file and no partial one, and is an ``OSError`` naming ``path``."""
    with atomic_path(path) as temporary:
        try:
            save_file(dict(tensors), temporary, metadata=dict(metadata) if metadata else None)
        except SafetensorError as error:
            reason = str(error)
            if "I/O error" not in reason:
                raise
            raise OSError(f"cannot write {path}: {reason.split('I/O error: ')[-1]}") from error


def write_state_dict(
    state_dict: dict[str, torch.Tensor],
    directory: str | Path,
    stem: str,
    variant: str | None = None,
    max_shard_size: int | str = "10GB",
) -> list[Path]:
    """Write ``state_dict`` in the diffusers layout: one file, or shards plus an index when it is large."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    single, index_name = weights_filenames(stem, variant)
    pattern = single.replace(".safetensors", "{suffix}.safetensors")
    split = split_torch_state_dict_into_shards(
        state_dict, filename_pattern=pattern, max_shard_size=max_shard_size
    )
    _remove_stale_weights(directory, single, index_name, keep=split.filename_to_tensors.keys())
    written = []
    for filename, names in split.filename_to_tensors.items():
        shard = {name: state_dict[name].detach().contiguous() for name in names}
        save_tensors_file(shard, directory / filename, metadata={"format": "pt"})
        written.append(directory / filename)
    if split.is_sharded:
        index = {"metadata": dict(split.metadata), "weight_map": split.tensor_to_filename}
        write_text(directory / index_name, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


def _remove_stale_weights(directory: Path, single: str, index_name: str, keep: Collection[str]) -> None:
    """Delete this stem and variant's weights from an earlier save, which a load could pick up instead.

    Like diffusers' ``save_pretrained`` (which removes old shards), extended to the single file and index.
    """
    shard = re.compile(re.escape(single.removesuffix(".safetensors")) + r"-\d{5}-of-\d{5}\.safetensors")
    for path in directory.iterdir():
        stale = path.name in (single, index_name) or shard.fullmatch(path.name) is not None
        if stale and path.name not in keep and path.is_file():
            path.unlink()
