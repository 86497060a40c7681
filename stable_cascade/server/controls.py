"""ControlNets in requests: the native API's control fields, A1111's inpainting mask and the A1111
ControlNet extension's units (``alwayson_scripts``, its key in any case: ``ControlNet``, ``controlnet``)
→ a job's :class:`ControlRef`.

The server reads no file a client names: a control's ControlNet is a released name the model has
(canny, inpainting, super_resolution) or one of the models folder's by name, and its images are
uploads (base64), kept under the store's inputs/ (a job as ``GET /v1/jobs/{id}`` shows it names those,
so it can be sent again). A unit's ``module`` (the extension's preprocessor) may be ``none`` or the
ControlNet's own control: Stable Cascade's ControlNets make their control from the image themselves.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

import PIL.Image
import PIL.ImageOps

from stable_cascade.engine import RELEASED_CONTROLNETS, ControlRef, Job, ModelLibrary, get_bundle
from stable_cascade.server.models import controlnet_path, served_controlnet
from stable_cascade.server.store import Store
from stable_cascade.server.uploads import Upload, decode_image, keep_image

#: The native API's control fields (besides the job's own), → ControlRef fields.
NATIVE_FIELDS = {"controlnet": "controlnet", "control_scale": "scale", "control_type": "control_type"}
UPLOADS = ("control_image", "mask")
#: A1111 ControlNet extension modules (preprocessors) taken: ``none`` (the image as it is) and the
#: controls our ControlNets make themselves (by the extension's names too).
A1111_MODULES = {"none": None, "canny": "canny", "inpaint": "inpainting", "inpaint_only": "inpainting"}
#: Words in other UIs' ControlNet model names → our controls ("control_v11p_sd15_canny").
_MODEL_WORDS = {"canny": "canny", "inpaint": "inpainting"}


def native_controls(
    fields: MutableMapping[str, Any], store: Store, library: ModelLibrary
) -> list[ControlRef]:
    """Pop the control fields of a ``POST /v1/jobs`` body: ``controlnet`` (a released name or one of
    the models folder's), ``control_image`` and ``mask`` (base64), ``control_scale``, ``control_type``."""
    given: dict[str, Any] = {
        ours: fields.pop(theirs) for theirs, ours in NATIVE_FIELDS.items() if theirs in fields
    }
    uploads = {name: decode_image(fields.pop(name), store, name) for name in UPLOADS if name in fields}
    if not given and not uploads:
        return []
    if "controlnet" not in given:
        raise ValueError(f"control fields need 'controlnet' ({', '.join(RELEASED_CONTROLNETS)})")
    given["controlnet"] = controlnet_path(library, given["controlnet"])
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


def check_served_controls(job: Job, store: Store, library: ModelLibrary) -> None:
    """Refuse controls that name ControlNet files outside the models folder, or images outside the
    store's uploads."""
    for control in job.controls:
        if not served_controlnet(library, control.controlnet):
            raise ValueError(
                "the server runs ControlNets by name: the models' own and its models folder's "
                "(GET /controlnet/model_list); remove ControlNet paths"
            )
        for path in (control.image, control.mask):
            if path is not None and Path(path).resolve().parent != store.inputs_dir.resolve():
                raise ValueError("send control images as uploads ('control_image', 'mask'), not as paths")


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


def a1111_controlnet(body: Mapping[str, Any], store: Store, library: ModelLibrary) -> ControlRef | None:
    """The A1111 ControlNet extension's first enabled unit (``alwayson_scripts``, the key in any case):
    ``model`` (a ControlNet by name; none: the module's), ``module``, ``input_image`` (or ``image``),
    ``mask`` (inpainting) and ``weight``."""
    scripts = body.get("alwayson_scripts") or {}
    if not isinstance(scripts, Mapping):
        raise ValueError("alwayson_scripts must be a JSON object of scripts")
    keys = [key for key in scripts if isinstance(key, str) and key.lower() == "controlnet"]
    if len(keys) > 1:
        raise ValueError(f"alwayson_scripts names the ControlNet twice ({', '.join(keys)}); send one")
    unit = _unit(scripts[keys[0]] if keys else None)
    if unit is None:
        return None
    module = unit.get("module", "none")
    if not isinstance(module, str) or module.lower() not in A1111_MODULES:
        raise ValueError(
            f"ControlNet module {module!r} is not supported; use none (Stable Cascade's ControlNets make "
            f"their control from the image), or {', '.join(m for m in A1111_MODULES if m != 'none')}"
        )
    model = unit.get("model", "none")
    if not isinstance(model, str):
        raise ValueError(f"a ControlNet unit's model is a name (GET /controlnet/model_list), got {model!r}")
    name = _unit_controlnet(model.split(" [", 1)[0].strip(), A1111_MODULES[module.lower()], library)
    image = unit.get("input_image") or unit.get("image")
    if not image:
        raise ValueError("the ControlNet unit needs input_image (a base64 image)")
    upload = decode_image(image, store, "the ControlNet unit's input_image")
    mask = unit.get("mask")
    kept = keep_image(decode_image(mask, store, "mask").image.convert("RGB"), store) if mask else None
    weight = unit.get("weight", 1.0)
    return ControlRef(
        controlnet_path(library, name),
        str(store.inputs_dir / upload.name),
        mask=None if kept is None else str(store.inputs_dir / kept.name),
        scale=weight,
    )


def _unit_controlnet(model: str, module: str | None, library: ModelLibrary) -> str:
    """The ControlNet a unit names: one of ours by name; else (another UI's model, such as
    ``control_v11p_sd15_canny``) the module's, or the control its name says."""
    if model in RELEASED_CONTROLNETS or model in library.controlnets:
        return model
    guessed = next((kind for word, kind in _MODEL_WORDS.items() if word in model.lower()), None)
    name = module or guessed
    if name is None:
        models = ", ".join([*RELEASED_CONTROLNETS, *library.controlnets])
        raise ValueError(f"unknown ControlNet model {model!r} with module none; name one of {models}")
    return name


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
        raise ValueError("the ControlNet script's args must be a list of ControlNet units (objects)")
    enabled = [unit for unit in args if flag(unit.get("enabled", True), "a ControlNet unit's enabled")]
    if len(enabled) > 1:
        raise ValueError(f"one ControlNet unit per request, got {len(enabled)} enabled")
    return enabled[0] if enabled else None
