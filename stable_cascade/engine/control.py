"""A job's ControlNet: which one, its control image (and inpainting mask), scale and control type.

A :class:`ControlRef` names the ControlNet by its released name (``canny``, ``inpainting``,
``super_resolution``: the job's model bundle supplies the file) or by an absolute file or folder path
with its sha256, and the control image and mask by absolute path with their pixels' sha256 (as
:func:`~stable_cascade.engine.hashing.image_sha256` computes it), so a record says exactly what steered
its image. Inpainting masks are white where new content is generated; super-resolution samples twice
the control image's size.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import PIL.Image

from stable_cascade.conditioning.control import SUPER_RESOLUTION_FACTOR
from stable_cascade.engine.hashing import FileHasher, image_sha256
from stable_cascade.engine.images import open_image
from stable_cascade.fields import CONTROL_TYPES, checks
from stable_cascade.loading.bundles import DEFAULT_BUNDLE, get_bundle
from stable_cascade.loading.controlnets import controlnet_spec, controlnet_type, is_released, local_controlnet


@dataclasses.dataclass(frozen=True)
class ControlRef:
    """One ControlNet of a job (see the module's docstring); ``control_type`` is resolved by
    :func:`resolve_control` from the name, the file or the folder's config when not given."""

    controlnet: str
    image: str
    image_sha256: str | None = None
    mask: str | None = None
    mask_sha256: str | None = None
    scale: float = 1.0
    control_type: str | None = None
    controlnet_sha256: str | None = None

    def validate(self, model: str = DEFAULT_BUNDLE) -> None:
        """The control's own checks, and that ``model`` (a bundle) has the released ControlNet it names."""
        if is_released(self.controlnet):  # the model has it (before the control's own checks)
            controlnet_spec(self.controlnet, get_bundle(model))
        if not isinstance(self.controlnet, str) or not self.controlnet:
            raise ValueError(f"a control's controlnet must be a name or a path, got {self.controlnet!r}")
        if not isinstance(self.image, str) or not self.image:
            raise ValueError(f"a control needs its control image's file name, got {self.image!r}")
        if not isinstance(self.image_sha256, str):
            raise ValueError(f"the control image {self.image} needs its sha256 (see image_sha256)")
        if (self.mask is None) != (self.mask_sha256 is None):
            raise ValueError(
                "a control's mask needs its sha256 and the sha256 its mask; give both or neither"
            )
        checks.check_float("the control scale", self.scale, 0.0, checks.MAX_CONTROL_SCALE)
        checks.check_choice("control type", self.control_type, CONTROL_TYPES)
        if is_released(self.controlnet) and self.control_type != self.controlnet:
            raise ValueError(
                f"the {self.controlnet} ControlNet takes {self.controlnet} control, not {self.control_type}"
            )
        if self.mask is not None and self.control_type != "inpainting":
            raise ValueError(
                f"a mask is for inpainting ControlNets; this one takes {self.control_type} control"
            )
        if self.mask is None and self.control_type == "inpainting":
            raise ValueError("inpainting needs a mask (white = the region to generate); pass one")


def resolve_control(
    control: ControlRef, hasher: FileHasher | None = None
) -> tuple[ControlRef, tuple[int, int]]:
    """``control`` with absolute paths, sha256s (of the files as they are now) and its control type, and
    the control image's size. Opens the images (a missing or unreadable file raises ``ValueError``);
    no model is loaded.
    """
    values: dict[str, object] = {}
    if not isinstance(control.controlnet, str) or not control.controlnet:
        raise ValueError(f"a control's controlnet must be a name or a path, got {control.controlnet!r}")
    if not is_released(control.controlnet):
        path = Path(local_controlnet(control.controlnet)).resolve()
        digest = (hasher or FileHasher()).sha256(path)
        values.update(controlnet=str(path), controlnet_sha256=digest)
    known = controlnet_type(str(values.get("controlnet", control.controlnet)))
    if control.control_type is None and known is None:
        raise ValueError(
            f"cannot tell which control ControlNet {control.controlnet} takes; pass a control type "
            f"({', '.join(CONTROL_TYPES)})"
        )
    if control.control_type is not None and known is not None and control.control_type != known:
        raise ValueError(f"ControlNet {control.controlnet} takes {known} control, not {control.control_type}")
    values["control_type"] = control.control_type or known
    image = _open("control image", control.image)
    values.update(image=str(Path(control.image).resolve()), image_sha256=image_sha256(image))
    if control.mask is not None:
        mask = _open("mask", control.mask)
        values.update(mask=str(Path(control.mask).resolve()), mask_sha256=image_sha256(mask))
    return dataclasses.replace(control, **values), image.size  # type: ignore[arg-type]


def super_resolution_size(size: tuple[int, int]) -> tuple[int, int]:
    """The output size for a super-resolution control image of ``size`` (width, height): twice it,
    rounded down to multiples of 8."""
    step = checks.SIZE_MULTIPLE
    width, height = size
    return max(step, width * SUPER_RESOLUTION_FACTOR // step * step), max(
        step, height * SUPER_RESOLUTION_FACTOR // step * step
    )


@dataclasses.dataclass(frozen=True)
class ControlImages:
    """A control's opened images, checked against the sha256s the job records."""

    image: PIL.Image.Image
    mask: PIL.Image.Image | None


def open_control(control: ControlRef) -> ControlImages:
    """The control image and mask a job names; ``ValueError`` when one is missing or differs."""
    image = _checked("control image", control.image, control.image_sha256)
    mask = None
    if control.mask is not None:
        mask = _checked("mask", control.mask, control.mask_sha256)
    return ControlImages(image, mask)


def _checked(what: str, path: str, digest: str | None) -> PIL.Image.Image:
    image = _open(what, path)
    if image_sha256(image) != digest:
        raise ValueError(
            f"the {what} {path} is not the one the job names (sha256 {str(digest)[:12]}…); pass the image "
            "the job was made with, or create the job again"
        )
    return image


def _open(what: str, path: str) -> PIL.Image.Image:
    try:
        return open_image(path)
    except FileNotFoundError as error:
        raise ValueError(f"the {what} {path} does not exist; pass an existing image file") from error
