"""Checkpoints for exact resume, in safetensors and JSON only (no pickle).

A checkpoint folder ``checkpoint-<step>/`` holds:

* ``model.safetensors``: the trained tensors (trained parameters and buffers of the trained modules);
* ``ema.safetensors``: their exponential moving average (when the EMA is on);
* ``state.safetensors``: the optimizer state and the adaptive loss buckets, flattened to named tensors;
  the nesting (param groups, hyperparameters) is JSON in the file's metadata;
* ``rng-<rank>.safetensors``: every random state of process ``rank`` (the training generator, torch CPU
  and CUDA, numpy, Python ``random``);
* ``trainer_state.json``: step, data position, the learning-rate schedule and the run's config.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from stable_cascade.checkpoint import (
    CheckpointError,
    parse_json,
    read_json_object,
    read_state_dict,
    save_tensors_file,
)
from stable_cascade.checkpoint.atomic import move_in, temporary_name, write_text

PREFIX = "checkpoint-"
TRAINER_STATE = "trainer_state.json"
MAX_STEP = 10**12  # a step count or data position in trainer_state.json
_TENSOR, _TUPLE = "__tensor__", "__tuple__"


def trained_tensors(module: nn.Module) -> dict[str, Tensor]:
    """The live tensors a checkpoint stores: trained parameters (by parameter name: LoRA adapters,
    which stay out of their host's state dict, included) and the persistent buffers."""
    tensors: dict[str, Tensor] = {n: p for n, p in module.named_parameters() if p.requires_grad}
    for name, value in module.state_dict(keep_vars=True).items():
        if not isinstance(value, nn.Parameter):
            tensors[name] = value
    return tensors


@torch.no_grad()
def assign_tensors(module: nn.Module, state: Mapping[str, Tensor], source: str) -> None:
    """Copy ``state`` into ``module``'s :func:`trained_tensors`, which it must match name for name."""
    live = trained_tensors(module)
    check_fits(live, state, source)
    for name, value in live.items():
        value.data.copy_(like_local(state[name], value))


def check_fits(live: Mapping[str, Tensor], state: Mapping[str, Tensor], source: str) -> None:
    """``state`` has exactly the names of ``live``, each with its shape (and floating where it is)."""
    missing, unexpected = sorted(live.keys() - state.keys()), sorted(state.keys() - live.keys())
    wrong = [
        f"{k} {tuple(state[k].shape)} (expected {tuple(v.shape)})"
        for k, v in live.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    wrong += [
        f"{k} is {state[k].dtype}"
        for k, v in live.items()
        if k in state and v.is_floating_point() and not state[k].is_floating_point()
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{source} does not fit the trained model (missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong {wrong[:3]}); use the task, models and options that wrote it"
        )


#: Module names that wrappers (DDP, torch.compile, activation checkpointing) insert into parameter
#: names; the optimizer state dict names parameters without them.
_WRAPPERS = frozenset({"module", "_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module"})


def parameters_by_name(model: nn.Module) -> dict[str, Tensor]:
    """The model's parameters under the names ``get_optimizer_state_dict`` gives them."""
    return {".".join(p for p in n.split(".") if p not in _WRAPPERS): v for n, v in model.named_parameters()}


def check_optimizer_state(state: Any, parameters: Mapping[str, Tensor], source: str) -> None:
    """An optimizer state read back (``get_optimizer_state_dict`` layout, keyed by parameter name) whose
    names and per-parameter tensor shapes fit ``parameters``; one line naming ``source`` otherwise."""
    entries, groups = (state.get("state"), state.get("param_groups")) if isinstance(state, dict) else (0, 0)
    if not isinstance(entries, dict) or not isinstance(groups, list):
        raise CheckpointError(f"{source} is not an optimizer state (no 'state' and 'param_groups')")
    named = [n for g in groups for n in (g.get("params", ()) if isinstance(g, dict) else (None,))]
    unknown = sorted(str(n) for n in {*entries, *named} if n not in parameters)
    if unknown:
        raise CheckpointError(
            f"{source} holds optimizer state for parameters the model does not train ({unknown[:3]}); use "
            "the task, models and options that wrote it"
        )
    for name, entry in entries.items():
        tensors = entry.values() if isinstance(entry, dict) else ()
        for value in tensors:
            if isinstance(value, Tensor) and value.ndim and value.shape != parameters[name].shape:
                raise CheckpointError(
                    f"{source}: the optimizer state of {name} has shape {tuple(value.shape)}, the parameter "
                    f"{tuple(parameters[name].shape)}; use the task, models and options that wrote it"
                )


def full_tensor(value: Tensor) -> Tensor:
    """A sharded (DTensor) value gathered to a plain tensor (a collective); others unchanged."""
    gather = getattr(value, "full_tensor", None)
    return gather() if callable(gather) else value


def like_local(full: Tensor, like: Tensor) -> Tensor:
    """``full`` on ``like``'s device and dtype, sharded as ``like`` when that is a DTensor."""
    mesh = getattr(like, "device_mesh", None)
    if mesh is not None:
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(like.dtype), mesh, like.placements)  # type: ignore[attr-defined]
    return full.to(like.device, like.dtype)


def flatten(value: Any, tensors: dict[str, Tensor], prefix: str) -> Any:
    """A JSON-able copy of ``value`` whose tensors are moved into ``tensors`` under ``prefix…`` names."""
    if isinstance(value, Tensor):
        name = f"{prefix}{len(tensors)}"
        tensors[name] = value.detach().cpu().contiguous()
        return {_TENSOR: name}
    if isinstance(value, Mapping):
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"cannot store a mapping with keys {list(value)[:3]}")
        # JSON keys are strings: remember which were ints (torch optimizers index their state by int).
        return {"__dict__": [[k, flatten(v, tensors, prefix)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {_TUPLE: [flatten(v, tensors, prefix) for v in value]}
    if isinstance(value, list):
        return [flatten(v, tensors, prefix) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a checkpoint")


def unflatten(value: Any, tensors: Mapping[str, Tensor]) -> Any:
    if isinstance(value, list):
        return [unflatten(v, tensors) for v in value]
    if isinstance(value, dict):
        if _TENSOR in value:
            return tensors[value[_TENSOR]]
        if _TUPLE in value:
            return tuple(unflatten(v, tensors) for v in value[_TUPLE])
        return {k: unflatten(v, tensors) for k, v in value["__dict__"]}
    return value


def save_tensors(path: Path, tensors: Mapping[str, Tensor], structure: Any = None) -> None:
    metadata = {"format": "pt"}
    if structure is not None:
        metadata["structure"] = json.dumps(structure)
    save_tensors_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path, metadata)


def load_tensors(path: Path) -> tuple[dict[str, Tensor], Any]:
    """The tensors of ``path`` and the JSON structure stored with them (None if absent)."""
    tensors = read_state_dict([path])
    with safe_open(path, framework="pt") as file:
        structure = (file.metadata() or {}).get("structure")
    return tensors, None if structure is None else parse_json(structure, f"the metadata of {path}")


def save_state(directory: Path, optimizer: Mapping[str, Any], loss_weights: Mapping[str, Tensor]) -> None:
    tensors: dict[str, Tensor] = {f"loss_weights/{k}": v for k, v in loss_weights.items()}
    structure = flatten(dict(optimizer), tensors, "optimizer/")
    save_tensors(directory / "state.safetensors", tensors, structure)


def load_state(directory: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The optimizer state dict and the loss-weight state of a checkpoint."""
    path = directory / "state.safetensors"
    tensors, structure = load_tensors(path)
    weights = {
        k.removeprefix("loss_weights/"): v for k, v in tensors.items() if k.startswith("loss_weights/")
    }
    try:
        optimizer = unflatten(structure, tensors)
    except (KeyError, TypeError, ValueError) as error:  # a structure that names no stored tensor
        raise CheckpointError(
            f"{path}: its optimizer structure does not match its tensors ({error!r})"
        ) from None
    return optimizer, weights


def save_rng(directory: Path, rank: int, generator: torch.Generator) -> None:
    """Every random state this process uses (written by each process)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    version, python_state, gauss_next = random.getstate()
    tensors = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "python": torch.tensor(python_state, dtype=torch.int64),
    }
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda/{index}"] = state
    scalars = {"numpy": [kind, position, has_gauss, cached], "python": [version, gauss_next]}
    save_tensors(directory / f"rng-{rank}.safetensors", tensors, scalars)


def load_rng(directory: Path, rank: int, generator: torch.Generator) -> None:
    path = directory / f"rng-{rank}.safetensors"
    if not path.is_file():
        raise ValueError(
            f"{directory} has no random state for process {rank}; resume with the number of processes "
            "that wrote the checkpoint"
        )
    tensors, scalars = load_tensors(path)
    try:
        generator.set_state(tensors["generator"])
        torch.set_rng_state(tensors["torch"])
        cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("cuda/"))]
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda)
        kind, position, has_gauss, cached = scalars["numpy"]
        np.random.set_state((kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached))
        version, gauss_next = scalars["python"]
        random.setstate((version, tuple(tensors["python"].tolist()), gauss_next))
    except (KeyError, TypeError, ValueError, RuntimeError) as error:  # missing or malformed states
        raise CheckpointError(f"{path} is not a random state this package wrote ({error!r})") from None


def non_finite_tensors(tensors: Mapping[str, Tensor]) -> list[str]:
    """The names of the floating tensors that hold NaN or Inf."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def check_resumable(tensors: Mapping[str, Tensor], path: Path) -> None:
    """Refuse to resume from weights holding NaN/Inf: the run would only continue diverged."""
    bad = non_finite_tensors(tensors)
    if bad:
        raise CheckpointError(
            f"{path} holds NaN/Inf in {len(bad)} tensor(s) (e.g. {', '.join(bad[:3])}): the run had diverged "
            "when it was saved; resume from an earlier checkpoint, with a lower learning rate"
        )


def write_trainer_state(directory: Path, values: Mapping[str, Any]) -> None:
    write_text(directory / TRAINER_STATE, json.dumps(values, indent=2, sort_keys=True) + "\n")


def read_trainer_state(directory: Path) -> dict[str, Any]:
    """``trainer_state.json``, after checking its values' types and ranges."""
    path = directory / TRAINER_STATE
    if not path.is_file():
        raise ValueError(f"{directory} is not a training checkpoint (it has no {TRAINER_STATE})")
    values = read_json_object(path)
    for name, low, required in (("step", 0, True), ("data_position", 0, False), ("world_size", 1, False)):
        value = values.get(name)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= MAX_STEP:
            raise CheckpointError(
                f"{path}: {name} must be a whole number from {low} to {MAX_STEP}, got {value!r}"
            )
    for name in ("scheduler", "config"):
        if not isinstance(values.get(name, {}), dict):
            raise CheckpointError(f"{path}: {name} must be a JSON object, got {values[name]!r}")
    return values


def checkpoints(output_dir: Path) -> list[Path]:
    """The finished checkpoint folders of a run, oldest first."""
    found = [p for p in output_dir.glob(f"{PREFIX}*") if re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(
        (p for p in found if (p / TRAINER_STATE).is_file()), key=lambda p: int(p.name[len(PREFIX) :])
    )


def resolve_resume(output_dir: Path, resume: str) -> Path:
    """The checkpoint ``resume`` names: a folder, or ``latest`` in ``output_dir``."""
    if resume == "latest":
        found = checkpoints(output_dir)
        if not found:
            raise ValueError(f"--resume latest: {output_dir} has no {PREFIX}<step> folder to resume from")
        return found[-1]
    path = Path(resume)
    read_trainer_state(path)  # raises when it is not a checkpoint
    return path


def check_output_dir(output_dir: Path, resume: str | None, final: str) -> None:
    """Before any work: ``output_dir`` is writable (made if needed) and, unless the run resumes, holds
    no earlier run (its checkpoints or ``final/`` would be replaced)."""
    earlier = [p.name for p in [*checkpoints(output_dir), output_dir / final] if p.exists()]
    if earlier and resume is None:
        raise ValueError(
            f"{output_dir} already holds a training run ({', '.join(earlier[-2:])}); continue it with "
            "--resume latest, or choose another output folder (-o), or delete it to start over"
        )
    probe = temporary_name(output_dir / "probe")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"cannot write into the output folder {output_dir} ({error.strerror or error}); choose another -o"
        ) from None


def partial_folder(output_dir: Path, step: int) -> Path:
    return output_dir / f"{PREFIX}{step}.partial"


def publish(partial: Path) -> Path:
    """Rename a completely written ``….partial`` folder to its final name (replacing an older one)."""
    final = partial.with_suffix("")
    move_in(partial, final, replace=True)
    return final
