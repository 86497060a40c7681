"""What a checkpoint file holds, from its tensor names and shapes (ComfyUI / diffusers-style rules).

:func:`identify` tells the Stable Cascade components apart (and ComfyUI bundles of them),
:func:`split_bundle` takes a bundle apart, and :func:`expect_kind` turns a wrong file into an error
that says what the file is and which class loads it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping
from enum import Enum
from typing import TypeVar

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert.infer import ShapeLike, infer_unet_config, infer_vq_config
from stable_cascade.specs import UNET_VARIANTS, UNetConfig, VQConfig

logger = logging.getLogger(__name__)
T = TypeVar("T")


class Kind(Enum):
    """The component a checkpoint holds; values read in sentences ("a Stage C (prior) checkpoint")."""

    STAGE_C = "Stage C (prior)"
    STAGE_B = "Stage B (decoder)"
    STAGE_A = "Stage A (VQGAN)"
    EFFNET = "EfficientNet encoder"
    PREVIEWER = "previewer"
    CONTROLNET = "ControlNet"
    COMFY_BUNDLE = "ComfyUI bundle"
    UNKNOWN = "unknown"

    @property
    def article(self) -> str:
        return "an" if self.value[0].lower() in "aeiou" else "a"

    @property
    def loader(self) -> str:
        """Where a file of this kind is loaded."""
        return _LOADERS[self]


_LOADERS = {
    Kind.STAGE_C: "StableCascadeUNet.from_single_file as the prior (StableCascadePriorPipeline)",
    Kind.STAGE_B: "StableCascadeUNet.from_single_file as the decoder (StableCascadeDecoderPipeline)",
    Kind.STAGE_A: "PaellaVQModel.from_single_file",
    Kind.EFFNET: "EfficientNetEncoder",
    Kind.PREVIEWER: "Previewer",
    Kind.CONTROLNET: "ControlNet.from_single_file (the Stage C ControlNet; pass it as controlnet=)",
    Kind.COMFY_BUNDLE: "split_bundle, then the loader of each part",
    Kind.UNKNOWN: "nothing in stable_cascade: check the file",
}


class Size(Enum):
    """Which released size a UNet has: full, lite, or anything else (fine-tunes keep their size)."""

    FULL = "full"
    LITE = "lite"
    CUSTOM = "custom"


@dataclasses.dataclass(frozen=True)
class Identity:
    """The result of :func:`identify`: ``size`` for UNets, the inferred ``config`` for UNets and Stage A."""

    kind: Kind
    size: Size | None = None
    config: UNetConfig | VQConfig | None = None


#: ComfyUI bundle prefixes → part names of :func:`split_bundle`; most specific prefixes first.
BUNDLE_PARTS: tuple[tuple[str, str], ...] = (
    ("model.diffusion_model.", "unet"),
    ("vae.encoder.", "effnet"),  # Stage C bundles: the EfficientNet encoder ...
    ("vae.previewer.", "previewer"),  # ... and the previewer
    ("vae.", "stage_a"),  # Stage B bundles: Stage A
    ("text_encoder.", "text_encoder"),  # CLIP text model, transformers key layout
    ("clip_l_vision.", "image_encoder"),  # CLIP vision model
)
_RELEASED = {Kind.STAGE_C: ("prior", "prior_lite"), Kind.STAGE_B: ("decoder", "decoder_lite")}


def identify(state_dict: Mapping[str, ShapeLike]) -> Identity:
    """What ``state_dict`` (tensors, or key → shape) holds.

    Rules, in order: ComfyUI bundle (``model.diffusion_model.*``, or only bundle prefixes);
    ControlNet (``backbone.*`` + ``projections.*``, or ``controlnet_blocks.*``); Stage B
    (``effnet_mapper.0.weight``); Stage C (``clip_txt_mapper.weight``); Stage A (the vquantizer
    codebook, either name); EfficientNet (``backbone.1.0.block.0.1.num_batches_tracked``); previewer
    (``blocks.11.num_batches_tracked``). For UNets the size is read off the inferred config: equal to
    the released full / lite config, else custom (also when the architecture cannot be inferred).
    """
    keys = state_dict.keys()
    if _is_bundle(keys):
        return Identity(Kind.COMFY_BUNDLE)
    if any(k.startswith("controlnet_blocks.") for k in keys) or (
        any(k.startswith("projections.") for k in keys) and any(k.startswith("backbone.") for k in keys)
    ):
        return Identity(Kind.CONTROLNET)
    if "effnet_mapper.0.weight" in keys:
        return _unet_identity(Kind.STAGE_B, state_dict)
    if "clip_txt_mapper.weight" in keys:
        return _unet_identity(Kind.STAGE_C, state_dict)
    if "vquantizer.codebook.weight" in keys or "vquantizer.embedding.weight" in keys:
        try:
            return Identity(Kind.STAGE_A, config=infer_vq_config(state_dict))
        except CheckpointError:
            return Identity(Kind.STAGE_A)
    if "backbone.1.0.block.0.1.num_batches_tracked" in keys:
        return Identity(Kind.EFFNET)
    if "blocks.11.num_batches_tracked" in keys:
        return Identity(Kind.PREVIEWER)
    return Identity(Kind.UNKNOWN)


def _is_bundle(keys: Iterable[str]) -> bool:
    names = list(keys)
    if any(k.startswith("model.diffusion_model.") for k in names):
        return True
    return bool(names) and all(k.startswith(tuple(p for p, _ in BUNDLE_PARTS)) for k in names)


def _unet_identity(kind: Kind, state_dict: Mapping[str, ShapeLike]) -> Identity:
    try:
        config = infer_unet_config(state_dict)
    except CheckpointError as error:
        logger.debug("%s architecture not inferred: %s", kind.value, error)
        return Identity(kind, Size.CUSTOM)
    full, lite = _RELEASED[kind]
    size = {UNET_VARIANTS[full]: Size.FULL, UNET_VARIANTS[lite]: Size.LITE}.get(config, Size.CUSTOM)
    return Identity(kind, size, config)


def split_bundle(state_dict: Mapping[str, T]) -> dict[str, dict[str, T]]:
    """A ComfyUI bundle's parts ("unet", "stage_a", "effnet", "previewer", "text_encoder",
    "image_encoder"; only those present), each with its prefix stripped.

    Tensors under no known prefix are left out with a warning naming them.
    """
    parts: dict[str, dict[str, T]] = {}
    unknown: list[str] = []
    for key, value in state_dict.items():
        for prefix, part in BUNDLE_PARTS:
            if key.startswith(prefix):
                parts.setdefault(part, {})[key.removeprefix(prefix)] = value
                break
        else:
            unknown.append(key)
    if not parts:
        prefixes = ", ".join(p for p, _ in BUNDLE_PARTS)
        raise CheckpointError(f"not a ComfyUI bundle: no tensor has one of the prefixes {prefixes}")
    if unknown:
        logger.warning("bundle tensors of no known part left out: %s", ", ".join(unknown[:10]))
    return parts


def _bundle_part(kind: Kind) -> str:
    return {
        Kind.STAGE_C: "unet",
        Kind.STAGE_B: "unet",
        Kind.STAGE_A: "stage_a",
        Kind.EFFNET: "effnet",
        Kind.PREVIEWER: "previewer",
    }.get(kind, "")


def expect_kind(state_dict: Mapping[str, ShapeLike], kind: Kind, source: str) -> Identity:
    """The identity of ``state_dict`` (of the matching part, for a bundle), or a ``CheckpointError``
    naming what ``source`` holds instead and which class loads that."""
    found = identify(state_dict)
    if found.kind is Kind.COMFY_BUNDLE and kind is not Kind.COMFY_BUNDLE:
        part = split_bundle(state_dict).get(_bundle_part(kind))
        if part is None:
            raise CheckpointError(
                f"{source} is a ComfyUI bundle without {kind.article} {kind.value} part; its parts: "
                f"{', '.join(split_bundle(state_dict))}"
            )
        found = identify(part)
    if found.kind is kind:
        return found
    raise CheckpointError(wrong_kind_message(source, found.kind, kind.article + " " + kind.value, state_dict))


def wrong_kind_message(source: str, found: Kind, expected: str, state_dict: Mapping[str, object]) -> str:
    """``"<source> is a Stage B (decoder) checkpoint, not a Stage C (prior) one; …"``."""
    if found is Kind.UNKNOWN:
        keys = ", ".join(list(state_dict)[:5]) or "no tensors"
        return (
            f"{source} is not a recognised Stable Cascade checkpoint (first keys: {keys}); expected "
            f"{expected} one: check the file"
        )
    return (
        f"{source} is {found.article} {found.value} checkpoint, not {expected} one; "
        f"load it with {found.loader}, or pass the right file"
    )
