"""Models by name: the named models and the models folder's checkpoints, LoRAs and ControlNets
(:class:`~stable_cascade.engine.ModelLibrary`) as requests name them and as the listings show them.

A request names models, never files: ``model`` (or A1111's ``sd_model_checkpoint``) is a named model
or a checkpoint, ``loras`` are LoRAs of the folder by name (``[{"name": "ink", "scale": 0.8}]``,
``["ink:0.8"]``, or ``<lora:ink:0.8>`` in the prompt, as AUTOMATIC1111 reads it), ``controlnet`` a
released ControlNet of the model or one of the folder. The job then holds the files' paths; a whole job
sent back (``{"job": …}``) may name only files of the folder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from stable_cascade.engine import (
    BUNDLES,
    RELEASED_CONTROLNETS,
    Job,
    LoraRef,
    ModelLibrary,
    ModelSources,
    available,
    get_bundle,
    native_size,
)
from stable_cascade.fields.prompts import prompt_loras


def model_arguments(library: ModelLibrary, name: object) -> dict[str, Any]:
    """The ``Job.create`` arguments of a model's name (A1111's titles, ``"name [hash]"``, too)."""
    if not isinstance(name, str):
        raise ValueError(f"a model is named by text, got {type(name).__name__}; see GET /sdapi/v1/sd-models")
    return {"models": library.sources(name.split(" [", 1)[0].strip())}


def lora_refs(library: ModelLibrary, given: object) -> list[LoraRef]:
    """A request's ``loras``: a list of ``{"name": …, "scale": …}`` or ``"name[:scale]"``."""
    if not isinstance(given, list):
        raise ValueError(
            'loras must be a list of LoRAs by name: [{"name": "ink", "scale": 0.8}] or ["ink:0.8"]'
        )
    refs = []
    for item in given:
        if isinstance(item, str):
            name, colon, scale = item.rpartition(":") if ":" in item else (item, "", "1")
            refs.append(LoraRef(str(library.lora(name.strip())), _scale(scale if colon else "1", name)))
        elif (
            isinstance(item, Mapping) and set(item) <= {"name", "scale"} and isinstance(item.get("name"), str)
        ):
            scale = item.get("scale", 1.0)
            if isinstance(scale, bool) or not isinstance(scale, (int, float)):
                raise ValueError(f"the scale of LoRA {item['name']!r} must be a number, got {scale!r}")
            refs.append(LoraRef(str(library.lora(item["name"])), float(scale)))
        else:
            raise ValueError(f'a LoRA is {{"name": …, "scale": …}} or "name:scale", got {item!r}')
    return refs


def prompt_arguments(library: ModelLibrary, arguments: dict[str, Any], loras: list[LoraRef]) -> None:
    """``<lora:name:weight>`` of the prompt taken out of it into ``arguments["loras"]`` (after ``loras``,
    those the request names), as AUTOMATIC1111 does."""
    prompt = arguments.get("prompt")
    refs = list(loras)
    if isinstance(prompt, str) and "<" in prompt:
        arguments["prompt"], tagged = prompt_loras(prompt)
        refs += [LoraRef(str(library.lora(lora.name)), lora.scale) for lora in tagged]
    paths = [ref.path for ref in refs]
    repeated = sorted({Path(p).stem for p in paths if paths.count(p) > 1})
    if repeated:
        raise ValueError(f"LoRA {', '.join(repeated)} is named twice; name each LoRA once")
    if refs:
        arguments["loras"] = refs


def checkpoint_size(arguments: dict[str, Any]) -> None:
    """A checkpoint's size when a request gives none: its base model's native size (the engine takes
    1024 for a Stage C it does not know)."""
    sources = arguments.get("models")
    if not isinstance(sources, ModelSources) or sources.prior is None:
        return
    controls = arguments.get("controls") or []
    derived = any("super_resolution" in (c.controlnet, c.control_type) for c in controls)
    reconstruct = arguments.get("task") == "reconstruct"
    if not derived and not reconstruct and arguments.get("width") is None and arguments.get("height") is None:
        arguments["width"] = arguments["height"] = sources.bundle.default_size


def check_served(job: Job, library: ModelLibrary) -> None:
    """Refuse a job that names files other than the models folder's: model files, LoRAs, ControlNets."""
    if library.name_of(job.models) is None:
        raise ValueError(
            "the server runs named models and its models folder's checkpoints only (see GET "
            "/sdapi/v1/sd-models); remove model paths"
        )
    for lora in job.named_loras:  # a preset's own LoRAs (the demo's LCM ones) come with the model
        if library.lora_name(lora.path) is None:
            raise ValueError("the server takes LoRAs by name from its models folder (GET /sdapi/v1/loras)")


def controlnet_path(library: ModelLibrary, name: object) -> str:
    """A request's ControlNet: a released name the job's model has, or one of the folder's by name."""
    if isinstance(name, str) and name in RELEASED_CONTROLNETS:
        return name
    if isinstance(name, str) and name in library.controlnets:
        return str(library.controlnets[name])
    offered = ", ".join([*RELEASED_CONTROLNETS, *library.controlnets])
    raise ValueError(f"unknown ControlNet {name!r}; the server runs these by name: {offered}")


def served_controlnet(library: ModelLibrary, controlnet: str) -> bool:
    return controlnet in RELEASED_CONTROLNETS or library.controlnet_name(controlnet) is not None


def job_names(library: ModelLibrary, job: Mapping[str, Any]) -> dict[str, Any]:
    """A stored job's models by name, as requests name them: ``model_name``, ``lora_names`` and
    ``controlnet_name`` (None where the server does not offer it now)."""
    sources = ModelSources(**{f: job.get(f) for f in ModelSources.__dataclass_fields__})
    loras = job.get("loras") or []
    controlnet = job.get("controlnet")
    if isinstance(controlnet, str) and controlnet not in RELEASED_CONTROLNETS:
        controlnet = library.controlnet_name(controlnet)
    return {
        "model_name": library.name_of(sources),
        "lora_names": [
            library.lora_name(str(lora.get("path"))) for lora in loras if isinstance(lora, Mapping)
        ],
        "controlnet_name": controlnet,
    }


def sd_models(library: ModelLibrary) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/sd-models``: A1111's shape, the named models then the folder's checkpoints."""
    named = [
        {"title": n, "model_name": n, "hash": None, "sha256": None, "filename": b.prior_repo, "config": None}
        for n, b in BUNDLES.items()
    ]
    return named + [
        {
            "title": name,
            "model_name": name,
            "hash": None,
            "sha256": None,
            "filename": library.relative(checkpoint.path),
            "config": None,
        }
        for name, checkpoint in library.checkpoints.items()
    ]


def lora_list(library: ModelLibrary) -> list[dict[str, Any]]:
    """``GET /sdapi/v1/loras``: A1111's shape."""
    return [
        {"name": name, "alias": name, "path": library.relative(path), "metadata": {}}
        for name, path in library.loras.items()
    ]


def model_info(library: ModelLibrary) -> dict[str, dict[str, Any]]:
    """The models the page offers: each with its description, native size, ControlNets, and whether it
    is here (``available``: false for a Hub model not downloaded)."""
    models: dict[str, dict[str, Any]] = {}
    for name in library.model_names():
        sources = library.sources(name)
        bundle = get_bundle(sources.model or "full")
        checkpoint = library.checkpoints.get(name)
        description = (
            bundle.description
            if checkpoint is None
            else f"{library.relative(checkpoint.path)} ({bundle.name})"
        )
        models[name] = {
            "description": description,
            "size": native_size(ModelSources(model=bundle.name)),
            "controlnets": [controlnet for controlnet, _ in bundle.controlnets] + list(library.controlnets),
            "available": available(sources),
        }
    return models


def _scale(text: str, name: str) -> float:
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"the scale of LoRA {name!r} must be a number, got {text!r}") from None
    if not math.isfinite(scale):
        raise ValueError(f"the scale of LoRA {name!r} must be a finite number, got {text!r}")
    return scale
