"""Image prompts in requests: the native API's ``image_prompts`` / ``negative_image_prompts`` uploads and
the A1111 ControlNet extension's IP-Adapter units.

The native API takes each as a list of ``{"image": <base64>, "strength": <number, default 1>}``; the
ControlNet extension's units whose ``module`` starts with ``ip-adapter`` (``input_image``, ``weight``)
are image prompts of that strength (the model's CLIP image conditioning takes them, and the IP-Adapters
a request names from the models folder, ``ip_adapters``, if any). Uploads are kept under the store's
inputs/, as every upload, so a job as ``GET /v1/jobs/{id}`` shows it names them and can be sent again.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

from stable_cascade.engine import Job
from stable_cascade.fields import FIELDS, checks
from stable_cascade.server.store import Store
from stable_cascade.server.uploads import decode_image

#: The job fields that are lists of image prompts.
NAMES = tuple(field.name for field in FIELDS if field.kind == "image_prompts")
IP_ADAPTER_MODULE = "ip-adapter"


def native_image_prompts(
    fields: MutableMapping[str, Any], store: Store
) -> dict[str, list[tuple[str, float]]]:
    """Pop the image prompt fields of a ``POST /v1/jobs`` body; their uploads kept, as (path, strength)."""
    found: dict[str, list[tuple[str, float]]] = {}
    for name in NAMES:
        if name not in fields:
            continue
        items = fields.pop(name)
        if not isinstance(items, list) or not all(isinstance(item, Mapping) for item in items):
            raise ValueError(f'{name} must be a list of {{"image": <base64>, "strength": <number>}} objects')
        found[name] = [_upload(item, f"{name}[{i}]", store) for i, item in enumerate(items)]
    return found


def _upload(item: Mapping[str, Any], where: str, store: Store) -> tuple[str, float]:
    unknown = sorted(set(item) - {"image", "strength"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} in {where}; keys: image, strength")
    if "image" not in item:
        raise ValueError(f"{where} needs 'image' (a base64 image)")
    strength = _strength(item.get("strength", 1.0), where)
    upload = decode_image(item["image"], store, f"{where}.image")
    return str(store.inputs_dir / upload.name), strength


def _strength(value: object, where: str) -> float:
    return float(checks.check_float(f"the strength of {where}", value, 0.0, checks.MAX_IMAGE_STRENGTH))


def a1111_image_prompts(body: Mapping[str, Any], store: Store) -> list[tuple[str, float]]:
    """The enabled IP-Adapter units of the ControlNet script's args (``alwayson_scripts``, the key in any
    case) as image prompts."""
    prompts = []
    for index, unit in enumerate(ip_adapter_units(body)):
        where = f"alwayson_scripts.controlnet.args[{index}]"
        image = unit.get("input_image", unit.get("image"))
        if image is None:
            raise ValueError(f"the IP-Adapter unit {where} needs input_image (a base64 image)")
        strength = _strength(unit.get("weight", 1.0), where)
        prompts.append(
            (str(store.inputs_dir / decode_image(image, store, f"{where}.input_image").name), strength)
        )
    return prompts


def ip_adapter_units(body: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The enabled ControlNet-extension units whose module is an IP-Adapter's (others are controls)."""
    scripts = body.get("alwayson_scripts")
    keys = (
        [k for k in scripts if isinstance(k, str) and k.lower() == "controlnet"]
        if isinstance(scripts, Mapping)
        else []
    )
    script = scripts[keys[0]] if keys else None  # type: ignore[index]
    args = script.get("args") if isinstance(script, Mapping) else None
    if not isinstance(args, list):
        return []
    return [
        unit
        for unit in args
        if isinstance(unit, Mapping) and is_ip_adapter(unit) and unit.get("enabled", True) not in (False, 0)
    ]


def is_ip_adapter(unit: Mapping[str, Any]) -> bool:
    module = unit.get("module")
    return isinstance(module, str) and module.lower().startswith(IP_ADAPTER_MODULE)


def check_served_image_prompts(job: Job, store: Store) -> None:
    """Refuse image prompts that name files outside the store's uploads."""
    for ref in (*job.image_prompts, *job.negative_image_prompts):
        if Path(ref.path).resolve().parent != store.inputs_dir.resolve():
            raise ValueError('send image prompts as uploads (image_prompts: [{"image": …}]), not as paths')
