"""LoRA files: ours (written by :func:`save_lora`), kohya / OneTrainer / ComfyUI and Stability's trainer.

Every format is read into :class:`LoRAWeights`: per part (``unet``: Stage C, ``text_encoder``: its
CLIP text model) a map from the file's layer names to ``(down, up, alpha)``. The names are matched
to a model's layers by :mod:`stable_cascade.lora.resolve`.

Our format (``format: stable-cascade-lora`` in the safetensors metadata), for each adapted layer
``<part>.<layer>`` with ``<part>`` ``unet`` or ``text_encoder`` and ``<layer>`` the module name in
the diffusers ``StableCascadeUNet`` / transformers ``CLIPTextModelWithProjection`` layout:

- ``<part>.<layer>.lora_down.weight``: (rank, in_features)
- ``<part>.<layer>.lora_up.weight``: (out_features, rank)
- ``<part>.<layer>.alpha``: a float32 scalar; the update is ``W += scale · alpha / rank · up @ down``.

Two optional metadata keys say what a LoRA is for: ``stage`` (``prior``: Stage C, the default, or
``decoder``: Stage B) and ``adapter`` (a kind such as ``lcm``, for presets that need one).

kohya / OneTrainer (as ComfyUI reads them): ``lora_prior_unet_<layer>`` and ``lora_prior_te_<layer>``
with the dots of the layer's name as underscores, the same three suffixes, ``alpha`` defaulting to the
rank. Stability's ``train/train_c_lora.py`` saves ``weights.<i>.lora_down`` / ``lora_up`` (alpha 1)
in the order of its ``apply_lora`` traversal, plus trained token embeddings (``embeddings.*``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import torch
from safetensors import safe_open
from torch import Tensor, nn

from stable_cascade.checkpoint import read_state_dict, save_tensors_file
from stable_cascade.lora.layers import lora_state_dict

logger = logging.getLogger(__name__)

LoRAFormat = Literal["stable-cascade", "kohya", "stability"]
Part = Literal["unet", "text_encoder"]
Stage = Literal["prior", "decoder"]
STAGES: tuple[Stage, ...] = ("prior", "decoder")
PARTS: tuple[Part, ...] = ("unet", "text_encoder")
FORMAT_TAG = "stable-cascade-lora"
FORMAT_VERSION = "1"
KOHYA_PREFIXES: dict[str, Part] = {"lora_prior_unet_": "unet", "lora_prior_te_": "text_encoder"}
_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}
_STABILITY_KEY = re.compile(r"weights\.(\d+)\.lora_(down|up)")
_STABILITY_EMBEDDINGS = ("embeddings.embeddings", "embeddings.indices")


class LoRAFormatError(ValueError):
    """A LoRA file that is not in a known format or does not fit the model; says what was expected."""


@dataclasses.dataclass(frozen=True)
class LoRALayer:
    """One layer's update ``alpha / rank · up @ down``: down (rank, in), up (out, rank)."""

    down: Tensor
    up: Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """(out_features, in_features) of the layer it fits."""
        return self.up.shape[0], self.down.shape[1]


@dataclasses.dataclass(frozen=True)
class LoRAWeights:
    """A LoRA as read from a file: its layers per part, keyed by the file's layer names."""

    unet: dict[str, LoRALayer]
    text_encoder: dict[str, LoRALayer] = dataclasses.field(default_factory=dict)
    format: LoRAFormat = "stable-cascade"
    source: str = "<memory>"
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)

    def part(self, name: Part) -> dict[str, LoRALayer]:
        return self.unet if name == "unet" else self.text_encoder

    @property
    def stage(self) -> Stage:
        """The stage the LoRA adapts: its metadata's ``stage`` (Stage C, ``prior``, when unsaid)."""
        return metadata_stage(self.metadata, self.source)

    @property
    def stem(self) -> str:
        """A name for the adapter: the file name without its suffix."""
        return Path(self.source).stem if self.source != "<memory>" else "lora"


def metadata_stage(metadata: Mapping[str, str], source: str) -> Stage:
    """``prior`` or ``decoder`` from a LoRA file's metadata (``prior`` when it has no ``stage``)."""
    stage = metadata.get("stage", "prior")
    if stage not in STAGES:
        raise LoRAFormatError(f"{source}: metadata stage must be 'prior' or 'decoder', got {stage!r}")
    return stage  # type: ignore[return-value]


def read_lora_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a LoRA safetensors file, its tensors left unread."""
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def load_lora_file(path: str | Path) -> LoRAWeights:
    """Read a LoRA safetensors file in any supported format (detected from its keys and metadata)."""
    path = Path(path)
    tensors = read_state_dict([path])
    return parse_lora(tensors, read_lora_metadata(path), str(path))


def parse_lora(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str) -> LoRAWeights:
    """:func:`load_lora_file` on tensors already read (``source`` names them in errors)."""
    keys = list(tensors)
    metadata = dict(metadata)
    if not keys:
        raise LoRAFormatError(
            f"{source} holds no tensors: it is an empty LoRA file; save or download it again"
        )
    if metadata.get("format") == FORMAT_TAG or any(k.split(".")[0] in PARTS for k in keys):
        parts = _parse_named(tensors, source, {f"{p}.": p for p in PARTS}, "unet.<layer>")
        return LoRAWeights(parts["unet"], parts["text_encoder"], "stable-cascade", source, metadata)
    if any(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys):
        parts = _parse_named(tensors, source, KOHYA_PREFIXES, "lora_prior_unet_<layer>")
        return LoRAWeights(parts["unet"], parts["text_encoder"], "kohya", source, metadata)
    if any(_STABILITY_KEY.fullmatch(k) for k in keys):
        return LoRAWeights(_parse_stability(tensors, source), {}, "stability", source, metadata)
    hint = ""
    if any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys):
        hint = " Its lora_unet_/lora_te_ names are those of a Stable Diffusion LoRA."
    raise LoRAFormatError(
        f"{source} is not a Stable Cascade LoRA in a known format: its keys are like {keys[:3]}. Expected "
        "ours (unet.<layer>.lora_down.weight, metadata format=stable-cascade-lora), kohya/OneTrainer "
        "(lora_prior_unet_<layer>.lora_down.weight, lora_prior_te_<layer>...) or Stability's trainer "
        f"(weights.<i>.lora_down).{hint}"
    )


def _parse_named(
    tensors: Mapping[str, Tensor], source: str, prefixes: Mapping[str, Part], example: str
) -> dict[Part, dict[str, LoRALayer]]:
    """Layers of the formats that name them: ``<prefix><layer><suffix>`` with the three suffixes."""
    found: dict[Part, dict[str, dict[str, Tensor]]] = {p: {} for p in PARTS}
    unknown = []
    for key, tensor in tensors.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        suffix = next((s for s in _SUFFIXES if key.endswith(s)), None)
        if prefix is None or suffix is None or len(key) <= len(prefix) + len(suffix):
            unknown.append(key)
            continue
        layer = key[len(prefix) : -len(suffix)]
        found[prefixes[prefix]].setdefault(layer, {})[_SUFFIXES[suffix]] = tensor
    if unknown:
        raise LoRAFormatError(
            f"{source}: {len(unknown)} key(s) that are not LoRA down/up/alpha tensors of a known part, "
            f"e.g. {unknown[:4]}; expected {example}{{.lora_down.weight,.lora_up.weight,.alpha}} (DoRA, "
            "LoHa, LoKr and other LyCORIS types are not supported)"
        )
    return {part: _layers(layers, source) for part, layers in found.items()}


def _layers(found: Mapping[str, Mapping[str, Tensor]], source: str) -> dict[str, LoRALayer]:
    layers = {}
    for name, pieces in found.items():
        if "down" not in pieces or "up" not in pieces:
            missing = "lora_down" if "down" not in pieces else "lora_up"
            raise LoRAFormatError(f"{source}: layer {name} has no {missing}.weight")
        alpha = pieces.get("alpha")
        layers[name] = _layer(name, pieces["down"], pieces["up"], alpha, source)
    return layers


def _layer(name: str, down: Tensor, up: Tensor, alpha: Tensor | float | None, source: str) -> LoRALayer:
    """Check the shapes (1x1 convolution LoRAs are taken as linear ones) and default alpha to the rank;
    float8 tensors are upcast to float32 (they are copied to each layer's dtype when applied)."""
    down, up = _floating(down, f"{name} lora_down", source), _floating(up, f"{name} lora_up", source)
    if isinstance(alpha, Tensor):
        alpha = _floating(alpha, f"{name} alpha", source)
    if down.ndim == 4 and down.shape[2:] == (1, 1) and up.ndim == 4 and up.shape[2:] == (1, 1):
        down, up = down.flatten(1), up.flatten(1)
    if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
        raise LoRAFormatError(
            f"{source}: layer {name} has lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)}; "
            "expected (rank, in_features) and (out_features, rank) of a linear layer"
        )
    if down.shape[0] == 0:
        raise LoRAFormatError(f"{source}: layer {name} has rank 0 (no update); a LoRA needs rank ≥ 1")
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise LoRAFormatError(f"{source}: the alpha of {name} has shape {tuple(alpha.shape)}, not ()")
        alpha = float(alpha.float().item())
    if not (bool(torch.isfinite(down).all()) and bool(torch.isfinite(up).all())) or not math.isfinite(
        alpha if alpha is not None else 0.0
    ):
        raise LoRAFormatError(
            f"{source}: layer {name} holds NaN/Inf values (lora_down, lora_up or alpha); the file is broken "
            "(e.g. a training run that diverged): use another checkpoint of it"
        )
    return LoRALayer(down, up, float(down.shape[0]) if alpha is None else alpha)


def _floating(tensor: Tensor, what: str, source: str) -> Tensor:
    """A LoRA tensor as a float one: float8 (e4m3fn, e5m2 …) upcast to float32, integers refused."""
    if not tensor.is_floating_point():
        raise LoRAFormatError(
            f"{source}: {what} is {tensor.dtype}; LoRA weights must be floating point (float32, float16, "
            "bfloat16 or float8): the file is not a LoRA or was quantised by a tool this package cannot read"
        )
    return tensor.float() if tensor.element_size() == 1 else tensor


def _parse_stability(tensors: Mapping[str, Tensor], source: str) -> dict[str, LoRALayer]:
    """``weights.<i>.lora_{down,up}`` as layers ``weights.<i>`` (alpha 1: the trainer's ``LoRA`` default)."""
    pairs: dict[int, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        match = _STABILITY_KEY.fullmatch(key)
        if match:
            pairs.setdefault(int(match[1]), {})[match[2]] = tensor
        elif key not in _STABILITY_EMBEDDINGS:
            unknown.append(key)
    if unknown:
        raise LoRAFormatError(
            f"{source}: keys {unknown[:4]} are not part of Stability's LoRA format (weights.<i>.lora_down, "
            "weights.<i>.lora_up, embeddings.embeddings, embeddings.indices)"
        )
    if sorted(pairs) != list(range(len(pairs))):
        numbers = sorted(pairs)
        raise LoRAFormatError(f"{source}: the weights.<i> are not numbered 0 … {len(pairs) - 1}: {numbers}")
    if "embeddings.embeddings" in tensors:
        logger.warning(
            "%s: its %d trained token embedding(s) (embeddings.*) are not applied: the file does not say "
            "which words they belong to",
            source,
            tensors["embeddings.embeddings"].shape[0],
        )
    for i, pair in pairs.items():
        if len(pair) != 2:
            raise LoRAFormatError(f"{source}: weights.{i} has lora_{next(iter(pair))} but not its other half")
    return {f"weights.{i}": _layer(f"weights.{i}", p["down"], p["up"], 1.0, source) for i, p in pairs.items()}


def save_lora(
    path: str | Path,
    unet: nn.Module | Mapping[str, Tensor] | None = None,
    text_encoder: nn.Module | Mapping[str, Tensor] | None = None,
    metadata: Mapping[str, str] | None = None,
    *,
    adapter: str = "default",
) -> Path:
    """Write adapter ``adapter`` of ``unet`` and ``text_encoder`` (modules, or :func:`lora_state_dict`
    results) in our format; ``metadata`` (str → str) is stored with ``format``, ``rank`` and ``alpha``."""
    tensors: dict[str, Tensor] = {}
    for part, source in (("unet", unet), ("text_encoder", text_encoder)):
        if source is None:
            continue
        state = lora_state_dict(source, adapter) if isinstance(source, nn.Module) else dict(source)
        tensors.update({f"{part}.{k}": v.detach().to("cpu").contiguous() for k, v in state.items()})
    if not tensors:
        raise ValueError("save_lora needs the adapted unet or text_encoder (or their lora_state_dict)")
    extra = dict(metadata or {})
    bad = {k: v for k, v in extra.items() if not isinstance(k, str) or not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata maps strings to strings; got {bad}")
    weights = parse_lora(tensors, {"format": FORMAT_TAG}, str(path))
    layers = [*weights.unet.values(), *weights.text_encoder.values()]
    header = {
        **extra,
        "format": FORMAT_TAG,
        "format_version": FORMAT_VERSION,
        "rank": ",".join(sorted({str(layer.rank) for layer in layers}, key=int)),
        "alpha": ",".join(sorted({f"{layer.alpha:g}" for layer in layers})),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_file(tensors, path, metadata=header)
    return path
