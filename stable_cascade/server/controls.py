"""ControlNets in requests: the native API's control fields, A1111's inpainting mask and the A1111
ControlNet extension's ``alwayson_scripts.controlnet`` → a job's :class:`ControlRef`.

The server reads no file a client names: a control's ControlNet is a released name the model has
(canny, inpainting, super_resolution) and its images are uploads (base64), kept under the store's
inputs/ (a job as ``GET /v1/jobs/{id}`` shows it names those, so it can be sent again).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps

from stable_cascade.engine import RELEASED_CONTROLNETS, ControlRef, Job, get_bundle
from stable_cascade.server.image_prompts import is_ip_adapter
from stable_cascade.server.store import Store
from stable_cascade.server.uploads import Upload, decode_image, keep_image

#: The native API's control fields (besides the job's own), → ControlRef fields.
NATIVE_FIELDS = {"controlnet": "controlnet", "control_scale": "scale", "control_type": "control_type"}
UPLOADS = ("control_image", "mask")
#: A1111 ControlNet extension modules (preprocessors) → our control types.
A1111_MODULES = {"canny": "canny"}


def native_controls(fields: MutableMapping[str, Any], store: Store) -> list[ControlRef]:
    """Pop the control fields of a ``POST /v1/jobs`` body: ``controlnet`` (a released name),
    ``control_image`` and ``mask`` (base64), ``control_scale``, ``control_type``."""
    given: dict[str, Any] = {
        ours: fields.pop(theirs) for theirs, ours in NATIVE_FIELDS.items() if theirs in fields
    }
    uploads = {name: decode_image(fields.pop(name), store, name) for name in UPLOADS if name in fields}
    if not given and not uploads:
        return []
    if "controlnet" not in given:
        raise ValueError(f"control fields need 'controlnet' ({', '.join(RELEASED_CONTROLNETS)})")
    _check_released(given["controlnet"])
    if "control_image" not in uploads:
        raise ValueError("'controlnet' needs 'control_image' (a base64 image)")
    image = str(store.inputs_dir / uploads["control_image"].name)
    mask = str(store.inputs_dir / uploads["mask"].name) if "mask" in uploads else None
    return [ControlRef(image=image, mask=mask, **given)]


def attach_uploads(job: Job, fields: MutableMapping[str, Any], store: Store) -> Job:
    """A whole job sent with ``control_image`` / ``mask`` uploads: its control names them (their
    sha256 must be the job's)."""
    uploads = {name: decode_image(fields.pop(name), store, name) for name in UPLOADS if name in fields}
    if not uploads:
        return job
    if not job.controls:
        raise ValueError("control_image or mask was sent with a job that has no control ('controls')")
    control = job.controls[0]
    changes: dict[str, Any] = {}
    for name, field in (("control_image", "image"), ("mask", "mask")):
        if name in uploads:
            upload = uploads[name]
            if upload.sha256 != getattr(control, f"{field}_sha256"):
                raise ValueError(f"{name} is not the image the job's control names (sha256 differs)")
            changes[field] = str(store.inputs_dir / upload.name)
    names = {"image": "control_image", "mask": "mask"}
    return job.replace(**{names[field]: path for field, path in changes.items()})


def check_served_controls(job: Job, store: Store) -> None:
    """Refuse controls that name ControlNet files or images outside the store's uploads."""
    for control in job.controls:
        _check_released(control.controlnet)
        for path in (control.image, control.mask):
            if path is not None and Path(path).resolve().parent != store.inputs_dir.resolve():
                raise ValueError("send control images as uploads ('control_image', 'mask'), not as paths")


def _check_released(controlnet: object) -> None:
    """Before any file is read: the server runs the models' own ControlNets, by name."""
    if controlnet not in RELEASED_CONTROLNETS:
        raise ValueError(
            f"the server runs the models' own ControlNets only ({', '.join(RELEASED_CONTROLNETS)}); "
            "remove ControlNet paths"
        )


def a1111_inpainting(body: Mapping[str, Any], upload: Upload, store: Store, model: str) -> ControlRef | None:
    """A1111 img2img's ``mask`` (+ ``inpainting_mask_invert``) → the model's inpainting control on the
    init image (A1111: white = repaint; inverted: black = repaint)."""
    if not body.get("mask"):
        return None
    if get_bundle(model).controlnet("inpainting") is None:
        raise ValueError(
            f"inpainting (mask) needs an inpainting ControlNet, which the {model} model does not have; "
            "use a model that has one (full), or send init_images without a mask"
        )
    mask = decode_image(body["mask"], store, "mask").image.convert("L")
    if flag(body.get("inpainting_mask_invert", False), "inpainting_mask_invert"):
        mask = PIL.ImageOps.invert(mask)
    kept = keep_image(mask.convert("RGB"), store)
    image = str(store.inputs_dir / upload.name)
    return ControlRef("inpainting", image, mask=str(store.inputs_dir / kept.name))


def a1111_controlnet(body: Mapping[str, Any], store: Store) -> ControlRef | None:
    """The A1111 ControlNet extension's first enabled unit (``alwayson_scripts.controlnet.args``):
    ``input_image`` (or ``image``), ``module`` (``canny``) and ``weight``."""
    scripts = body.get("alwayson_scripts") or {}
    unit = _unit(scripts.get("controlnet") if isinstance(scripts, Mapping) else None)
    if unit is None:
        return None
    module = unit.get("module", "canny")
    if not isinstance(module, str) or module not in A1111_MODULES:
        raise ValueError(f"ControlNet module {module!r} is not supported; use {', '.join(A1111_MODULES)}")
    image = unit.get("input_image", unit.get("image"))
    if image is None:
        raise ValueError("the ControlNet unit needs input_image (a base64 image)")
    upload = decode_image(image, store, "alwayson_scripts.controlnet.args[0].input_image")
    weight = unit.get("weight", 1.0)
    return ControlRef(A1111_MODULES[module], str(store.inputs_dir / upload.name), scale=weight)


def flag(value: object, name: str) -> bool:
    """A yes/no field: JSON's true or false, or 1 or 0 (as A1111's clients send some); text such as
    "false" is refused, not taken as yes."""
    if not isinstance(value, int) or value not in (0, 1):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _unit(script: object) -> Mapping[str, Any] | None:
    if script is None:
        return None
    args = script.get("args") if isinstance(script, Mapping) else None
    if not isinstance(args, list) or not all(isinstance(unit, Mapping) for unit in args):
        raise ValueError("alwayson_scripts.controlnet.args must be a list of ControlNet units (objects)")
    enabled = [
        unit
        for unit in args
        if flag(unit.get("enabled", True), "a ControlNet unit's enabled") and not is_ip_adapter(unit)
    ]  # IP-Adapter units are image prompts (server/image_prompts.py)
    if len(enabled) > 1:
        raise ValueError(f"one ControlNet unit per request, got {len(enabled)} enabled")
    return enabled[0] if enabled else None
