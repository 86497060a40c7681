"""Checks on a folder before a third-party loader (transformers) reads it: no pickle, no folder code.

Pickle weights (``pytorch_model.bin`` …) can run arbitrary code while they are read, and an
``auto_map`` entry in a config file asks transformers to import Python files shipped with the folder.
Neither is ever done without the caller's opt-in, so such folders are refused up front with a message
saying what was found and how to convert it.
"""

from __future__ import annotations

from pathlib import Path

from stable_cascade.checkpoint.errors import CheckpointError
from stable_cascade.checkpoint.files import check_shard_name
from stable_cascade.checkpoint.jsonio import read_json
from stable_cascade.limits import check_transformers_config

#: Suffixes of files that ``torch.load``/``pickle`` would read.
PICKLE_SUFFIXES = frozenset({".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle"})


def check_json_files(folder: Path, component: str) -> None:
    """Read every JSON file of ``folder`` (configs, ``vocab.json``, ``tokenizer.json`` …) so a broken
    one is named in one line; refuse the folder when a config maps a class to the folder's own code
    (``auto_map``), when ``config.json`` holds absurd sizes (``vocab_size`` 10⁹, 200,000 layers: see
    :data:`~stable_cascade.limits.TRANSFORMERS_BOUNDS`) or a shard index names files outside it."""
    for path in sorted(folder.glob("*.json")):
        if not path.is_file():
            continue
        data = read_json(path)
        if path.name == "config.json" and isinstance(data, dict):
            check_transformers_config(data, str(path))
        if path.name.endswith(".index.json") and isinstance(data, dict):
            for shard in (data.get("weight_map") or {}).values():
                check_shard_name(str(shard), path)
        if isinstance(data, dict) and "auto_map" in data:
            raise CheckpointError(
                f"{path} (component {component!r}) has an 'auto_map' entry, which asks to run Python code "
                "shipped with the model; this package never runs a folder's code. Use a folder written "
                "by a transformers class (no 'auto_map'), or load the component yourself and pass it in"
            )


def check_no_pickle_only_weights(folder: Path, component: str) -> None:
    """Refuse ``folder`` when it holds pickle weights and no ``.safetensors`` file."""
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles and not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} (component {component!r}) holds only pickle weights ({', '.join(pickles)}); this "
            "package reads safetensors only, because loading a pickle can run arbitrary code. If you "
            "trust the file, convert it once, e.g. `transformers.AutoModel.from_pretrained(folder)"
            ".save_pretrained(folder, safe_serialization=True)`, then load again"
        )


def check_transformers_folder(folder: str | Path, component: str) -> None:
    """Both checks, for a local folder (a Hub repo id is left to transformers' own safe options)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    check_json_files(folder, component)
    check_no_pickle_only_weights(folder, component)
