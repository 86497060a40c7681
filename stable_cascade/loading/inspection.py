"""What a checkpoint file or folder is, read from safetensors headers alone (no tensor is loaded).

:func:`inspect_path` reports the stage (``convert.identify``), the size (full / lite / custom), the
dtype, the parameter count and the layout: an original single file, a diffusers-layout file, a
ComfyUI bundle (with its parts), a diffusers model folder (``config.json``) or a pipeline folder
(``model_index.json``, with its components). :func:`released_models` describes the released UNets
and Stage A, built on the ``meta`` device.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from stable_cascade.checkpoint import CheckpointError, read_json_object
from stable_cascade.convert import Identity, Kind, identify, split_bundle
from stable_cascade.convert.controlnet import controlnet_config_from_state_dict
from stable_cascade.convert.keys import is_original_unet_layout
from stable_cascade.loading.components import MODEL_INDEX, is_component_entry
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import UNET_VARIANTS, VQ_VARIANTS

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_DTYPE_NAMES = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16", "F8_E4M3": "fp8_e4m3"}
_FLOATING = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")
_WEIGHTS = re.compile(r"^(?P<stem>[\w\-]+?)(?:\.(?P<variant>\w+))?(?:-\d{5}-of-\d{5})?\.safetensors$")
_CODEBOOK_ORIGINAL = "vquantizer.codebook.weight"


@dataclasses.dataclass(frozen=True)
class Header:
    """The tensor names, shapes and dtypes of one or more safetensors files (shards)."""

    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, str]

    @property
    def parameters(self) -> int:
        """Elements of the floating-point tensors (integer buffers such as BatchNorm counters left out)."""
        return sum(math.prod(s) for k, s in self.shapes.items() if self.dtypes[k] in _FLOATING)

    @property
    def dtype(self) -> str:
        """The floating dtype(s), the most common first (``"bf16"``, ``"fp32 + fp16"``)."""
        counts: Counter[str] = Counter()
        for key, shape in self.shapes.items():
            if self.dtypes[key] in _FLOATING:
                counts[_DTYPE_NAMES.get(self.dtypes[key], self.dtypes[key].lower())] += math.prod(shape)
        return " + ".join(name for name, _ in counts.most_common()) or "none"

    def bundle_parts(self) -> dict[str, Header]:
        """The headers of a ComfyUI bundle's parts, prefixes stripped (:func:`convert.split_bundle`)."""
        entries = {k: (shape, self.dtypes[k]) for k, shape in self.shapes.items()}
        return {
            part: Header({k: v[0] for k, v in items.items()}, {k: v[1] for k, v in items.items()})
            for part, items in split_bundle(entries).items()
        }


def read_header(*files: str | Path) -> Header:
    """Names, shapes and dtypes of safetensors files, without reading their tensors."""
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    for file in map(Path, files):
        if file.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(
                f"{file} is a pickle file, which can run arbitrary code and is never read; convert it to "
                "safetensors with a tool you trust"
            )
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist")
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    tensor = handle.get_slice(key)
                    shapes[key] = tuple(tensor.get_shape())
                    dtypes[key] = tensor.get_dtype()
        except (SafetensorError, OSError) as error:
            raise CheckpointError(f"{file} is not a readable safetensors file: {error}") from error
    return Header(shapes, dtypes)


@dataclasses.dataclass
class Report:
    """What one file, folder, bundle part or component is; ``lines()`` is the text ``inspect`` prints."""

    name: str
    what: str
    facts: dict[str, str] = dataclasses.field(default_factory=dict)
    parts: list[Report] = dataclasses.field(default_factory=list)

    def lines(self, indent: int = 0) -> list[str]:
        pad = "  " * indent
        lines = [f"{pad}{self.name}: {self.what}"]
        lines += [f"{pad}  {key}: {value}" for key, value in self.facts.items()]
        for part in self.parts:
            lines += part.lines(indent + 1)
        return lines


def inspect_path(path: str | Path) -> Report:
    """Describe a checkpoint file, a diffusers model folder or a pipeline folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    if path.is_file():
        return _file_report(path)
    if (path / MODEL_INDEX).is_file():
        return _pipeline_report(path)
    if (path / "config.json").is_file():
        return _model_folder_report(path, path.name)
    raise ValueError(
        f"{path} is a folder without {MODEL_INDEX} or config.json: neither a diffusers pipeline nor a "
        "model folder; pass a checkpoint file or one of those folders"
    )


def _file_report(path: Path) -> Report:
    header = read_header(path)
    identity = identify(header.shapes)
    if identity.kind is Kind.COMFY_BUNDLE:
        report = Report(str(path), "ComfyUI bundle", _totals(header, "ComfyUI bundle (one file)"))
        for part, sub in header.bundle_parts().items():
            report.parts.append(Report(part, *_describe(sub, identify(sub.shapes))))
        return report
    what, facts = _describe(header, identity)
    return Report(str(path), what, facts)


def _describe(header: Header, identity: Identity) -> tuple[str, dict[str, str]]:
    """The kind and the facts of one component's tensors."""
    kind = identity.kind
    if kind is Kind.UNKNOWN:
        first = ", ".join(list(header.shapes)[:3]) or "no tensors"
        what = f"not a recognised Stable Cascade component (first keys: {first})"
        return what, _totals(header, "unknown")
    facts: dict[str, str] = {}
    if identity.size is not None:
        facts["variant"] = identity.size.value
    unet = kind in (Kind.STAGE_B, Kind.STAGE_C)
    diffusers_keys = (unet and not is_original_unet_layout(header.shapes)) or (
        kind is Kind.STAGE_A and _CODEBOOK_ORIGINAL not in header.shapes
    )
    facts.update(_totals(header, "diffusers keys" if diffusers_keys else "original single file"))
    if kind is Kind.CONTROLNET:
        facts.update(_controlnet_facts(header))
    return kind.value, facts


def _controlnet_facts(header: Header) -> dict[str, str]:
    """A ControlNet's backbone, control input, width and projections, read from its shapes."""
    projections = sum(1 for k in header.shapes if re.match(r"^projections\.\d+\.0\.weight$", k))
    config = controlnet_config_from_state_dict(header.shapes, "the file", tuple(range(projections)))
    return {
        "backbone": config.backbone,
        "control": config.control_type or f"unknown ({config.in_channels} input channels)",
        "Stage C width": str(config.out_channels),
        "projections": str(projections),
    }


def _totals(header: Header, layout: str) -> dict[str, str]:
    return {
        "layout": layout,
        "dtype": header.dtype,
        "parameters": f"{header.parameters:,}",
        "tensors": str(len(header.shapes)),
    }


def weight_files(folder: Path) -> dict[str | None, list[Path]]:
    """The safetensors weights of a model folder by variant (None: no variant), shards sorted."""
    groups: dict[str | None, list[Path]] = {}
    for file in sorted(folder.glob("*.safetensors")):
        match = _WEIGHTS.match(file.name)
        groups.setdefault(match.group("variant") if match else None, []).append(file)
    return groups


def _model_folder_report(folder: Path, name: str, declared: str | None = None) -> Report:
    config = read_json_object(folder / "config.json")
    class_name = declared or str(config.get("_class_name") or _first(config.get("architectures")) or "model")
    groups = weight_files(folder)
    if not groups:
        return Report(name, class_name, {"layout": "diffusers model folder", "weights": "none"})
    variant = None if None in groups else sorted(groups, key=str)[0]
    header = read_header(*groups[variant])
    identity = identify(header.shapes)
    if identity.kind is Kind.UNKNOWN:  # a transformers model, a component we do not identify
        what, facts = class_name, _totals(header, "")
    else:
        what, facts = _describe(header, identity)
    shards = len(groups[variant])
    facts["layout"] = "diffusers model folder" + (f" ({shards} shards)" if shards > 1 else "")
    facts["class"] = class_name
    variants = [v or "default" for v in groups]
    if len(variants) > 1 or variant is not None:
        facts["weight variants"] = ", ".join(variants) + f" (shown: {variant or 'default'})"
    return Report(name, what, facts)


def _pipeline_report(folder: Path) -> Report:
    index = read_json_object(folder / MODEL_INDEX)
    class_name = str(index.get("_class_name", "pipeline"))
    report = Report(str(folder), class_name, {"layout": "diffusers pipeline folder"})
    config = {k: v for k, v in index.items() if not k.startswith("_") and not is_component_entry(v)}
    if config:
        report.facts["config"] = ", ".join(f"{k}={v}" for k, v in config.items())
    listed = set()
    for name, entry in index.items():
        if name.startswith("_") or not is_component_entry(entry):
            continue
        listed.add(name)
        library, declared = entry[0], entry[1]  # type: ignore[index]
        if library is None or declared is None:
            report.parts.append(Report(name, "absent (optional)"))
        elif (folder / name / "config.json").is_file() and weight_files(folder / name):
            report.parts.append(_model_folder_report(folder / name, name, f"{library}.{declared}"))
        else:
            report.parts.append(Report(name, f"{library}.{declared}"))
    for extra in sorted(p for p in folder.iterdir() if p.is_dir() and p.name not in listed):
        if (extra / "config.json").is_file():
            sub = _model_folder_report(extra, extra.name)
            sub.what += " (not in the index; loadable with subfolders=...)"
            report.parts.append(sub)
    return report


def _first(value: object) -> object:
    return value[0] if isinstance(value, list) and value else None


@dataclasses.dataclass(frozen=True)
class ReleasedModel:
    name: str
    stage: str
    parameters: int
    latent: str


def released_models() -> list[ReleasedModel]:
    """The released UNets and Stage A with their parameter counts (built on ``meta``: no download)."""
    models = []
    with torch.device("meta"):
        for name in ("prior", "prior_lite", "decoder", "decoder_lite"):
            config = UNET_VARIANTS[name]
            count = sum(p.numel() for p in StableCascadeUNet(config).parameters())
            stage, latent = ("B", "4x256x256") if config.is_stage_b else ("C", "16x24x24")
            models.append(ReleasedModel(name, stage, count, latent))
        count = sum(p.numel() for p in PaellaVQModel(VQ_VARIANTS["vqgan"]).parameters())
        models.append(ReleasedModel("vqgan", "A", count, "image 3x1024x1024"))
    return models
