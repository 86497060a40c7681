"""Generation parameters stored in PNG files, and the file hashes they cite.

Every image carries two text chunks: ``parameters``, the AUTOMATIC1111 "infotext" that image viewers
and web UIs show::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20+10, Sampler: ddpm, CFG scale: 4.0+1.1, Seed: 42, Size: 1024x1024, Model: full, ...

(Stage C and Stage B values joined by ``+``), and ``stable_cascade``, a JSON record of every setting
needed to reproduce the image: both stages' settings, seed, size, prompts, img2img strength and the
input image's hash, the models and the sha256 of local model files, the package version.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Literal, get_args

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from stable_cascade.pipelines.presets import PRESETS, get_preset

INFOTEXT_KEY = "parameters"
JSON_KEY = "stable_cascade"
SCHEMA = 1

Task = Literal["txt2img", "img2img", "variation", "reconstruct"]
TASKS: tuple[str, ...] = get_args(Task)
_CHUNK = 1 << 24  # bytes read at a time when hashing


def package_version() -> str:
    try:
        return importlib_metadata.version("stable-cascade")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class StageParameters:
    """The settings one stage sampled with (the preset's values with every override applied)."""

    steps: int
    guidance: float
    sampler: str
    shift: float
    rescale: float


@dataclasses.dataclass(frozen=True)
class GenerationParameters:
    """Everything that made one image. ``prior`` is None when Stage C did not run (reconstruct).

    ``seed`` is this image's own seed: image ``i`` of a batch started with seed ``s`` has ``s + i``
    (and ``batch_index`` ``i``), so a single run with ``seed`` draws the same noise.
    """

    task: Task
    prompt: str
    negative_prompt: str
    seed: int
    width: int
    height: int
    preset: str
    prior: StageParameters | None
    decoder: StageParameters
    dtype: str
    strength: float | None = None
    input_image: str | None = None  # the file name given
    input_image_sha256: str | None = None
    models: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role → repo id or path
    model_sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role → digest
    batch_index: int = 0
    batch_size: int = 1
    version: str = dataclasses.field(default_factory=package_version)

    def to_json(self) -> str:
        return json.dumps({"schema": SCHEMA, **dataclasses.asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the JSON record") -> GenerationParameters:
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise TypeError(f"a JSON object is expected, got {type(data).__name__}")
            data.pop("schema", None)
            for stage in ("prior", "decoder"):
                if data.get(stage) is not None:
                    data[stage] = StageParameters(**data[stage])
            parameters = cls(**data)
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{source} is not a valid {JSON_KEY} record: {error}") from error
        if parameters.task not in TASKS:
            raise ValueError(f"{source}: unknown task {parameters.task!r}; expected one of {TASKS}")
        return parameters

    def infotext(self) -> str:
        """The AUTOMATIC1111-style ``parameters`` text."""
        stages = [s for s in (self.prior, self.decoder) if s is not None]
        fields = {
            "Steps": _joined(s.steps for s in stages),
            "Sampler": _joined(dict.fromkeys(s.sampler for s in stages)),  # one name when equal
            "CFG scale": _joined(s.guidance for s in stages),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model": model_label(self.models, ("prior", "decoder") if self.prior else ("decoder",)),
            "Preset": self.preset,
            "Shift": _joined(s.shift for s in stages if s is stages[0] or s.shift != 1.0),
        }
        if self.strength is not None:
            fields["Denoising strength"] = self.strength
        if self.task != "txt2img":
            fields["Task"] = self.task
        fields["Version"] = f"stable-cascade {self.version}"
        lines = [self.prompt]
        if self.negative_prompt:
            lines.append(f"Negative prompt: {self.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quoted(v)}" for k, v in fields.items()))
        return "\n".join(lines)


def model_label(models: Mapping[str, str], roles: tuple[str, ...] = ("prior", "decoder")) -> str:
    """A short name for the models: the bundle name, or the last parts of the prior and decoder."""
    bundle = models.get("model")
    stages = [models.get(role) for role in roles]
    if bundle and not any(stages):
        return bundle
    names = [Path(s).name if s else bundle or "default" for s in stages]
    return " + ".join(names)


def _joined(values: Any) -> str:
    return "+".join(str(v) for v in values)


def _quoted(value: object) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


# -- PNG files -------------------------------------------------------------------------------------


def png_info(parameters: GenerationParameters) -> PngInfo:
    info = PngInfo()
    info.add_text(INFOTEXT_KEY, parameters.infotext())
    info.add_text(JSON_KEY, parameters.to_json())
    return info


def save_png(image: PIL.Image.Image, path: str | Path, parameters: GenerationParameters) -> None:
    """Write ``image`` as a PNG carrying both text chunks."""
    image.save(Path(path), format="PNG", pnginfo=png_info(parameters))


def read_png(path: str | Path) -> GenerationParameters:
    """The parameters stored in an image: the JSON record, else the parsed ``parameters`` text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with PIL.Image.open(path) as image:
            chunks = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error
    if JSON_KEY in chunks:
        return GenerationParameters.from_json(chunks[JSON_KEY], f"the {JSON_KEY} chunk of {path}")
    if INFOTEXT_KEY in chunks:
        return parse_infotext(chunks[INFOTEXT_KEY], str(path))
    raise ValueError(f"{path} carries no generation parameters (no {JSON_KEY!r} or {INFOTEXT_KEY!r} text)")


# -- infotext parsing ------------------------------------------------------------------------------

_FIELD = re.compile(r'\s*([\w .\-]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str, source: str = "the parameters text") -> GenerationParameters:
    """Parameters from an infotext alone (ours, or another tool's): what it lacks comes from the preset.

    The last line holding ``Steps:`` carries the settings; a ``Negative prompt:`` line starts the
    negative prompt; everything before it is the prompt.
    """
    lines = text.strip().split("\n")
    settings_at = max((i for i, line in enumerate(lines) if "Steps:" in line), default=None)
    if settings_at is None:
        raise ValueError(f"{source}: no 'Steps:' line in its parameters text")
    fields = {m.group(1).strip(): _unquoted(m.group(2).strip()) for m in _FIELD.finditer(lines[settings_at])}
    prompt_lines, negative_lines = lines[:settings_at], []
    for i, line in enumerate(prompt_lines):
        if line.startswith("Negative prompt:"):
            prompt_lines, negative_lines = prompt_lines[:i], prompt_lines[i:]
            break
    negative = "\n".join(negative_lines).removeprefix("Negative prompt:").strip()
    try:
        return _from_fields(fields, "\n".join(prompt_lines).strip(), negative)
    except (KeyError, ValueError) as error:
        raise ValueError(f"{source}: cannot read its parameters text ({error})") from error


def _from_fields(fields: Mapping[str, str], prompt: str, negative: str) -> GenerationParameters:
    preset = fields.get("Preset", "reference")
    defaults = get_preset(preset, PRESETS)
    steps, cfg, samplers, shifts = (
        fields.get(k, "").split("+") for k in ("Steps", "CFG scale", "Sampler", "Shift")
    )
    task = fields.get("Task", "txt2img")
    staged = [("prior", defaults.prior), ("decoder", defaults.decoder)]
    if task == "reconstruct":
        staged = staged[1:]
    stages: dict[str, StageParameters] = {}
    for i, (name, default) in enumerate(staged):
        stages[name] = StageParameters(
            steps=int(_item(steps, i) or default.num_inference_steps),
            guidance=float(_item(cfg, i) or default.guidance_scale),
            sampler=_item(samplers, i) or default.sampler,
            shift=float(_item(shifts, i) or default.shift),
            rescale=default.guidance_rescale,
        )
    width, _, height = fields.get("Size", "1024x1024").partition("x")
    strength = fields.get("Denoising strength")
    return GenerationParameters(
        task=task if task in TASKS else "txt2img",  # type: ignore[arg-type]
        prompt=prompt,
        negative_prompt=negative,
        seed=int(fields["Seed"]),
        width=int(width),
        height=int(height),
        preset=preset,
        prior=stages.get("prior"),
        decoder=stages["decoder"],
        dtype=fields.get("Dtype", "auto"),
        strength=float(strength) if strength else None,
    )


def _item(values: list[str], index: int) -> str:
    """Value ``index`` of a ``C+B`` pair; a single value serves both stages."""
    if not values or values == [""]:
        return ""
    return values[index] if index < len(values) else values[-1]


def _unquoted(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return str(json.loads(value))
        except json.JSONDecodeError:
            return value[1:-1]
    return value


# -- file hashes -----------------------------------------------------------------------------------


class FileHasher:
    """sha256 digests of files (and model folders), computed once per file path, mtime and size.

    A folder's digest covers its ``*.safetensors`` files (sorted relative paths and their digests),
    which is what identifies a model folder's weights.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int, int], str] = {}

    def sha256(self, path: str | Path) -> str:
        path = Path(path)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*.safetensors") if p.is_file())
            combined = hashlib.sha256()
            for file in files:
                combined.update(f"{file.relative_to(path).as_posix()}\0{self._file(file)}\n".encode())
            return combined.hexdigest()
        return self._file(path)

    def _file(self, path: Path) -> str:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
        if key not in self._cache:
            self._cache[key] = sha256_file(path)
        return self._cache[key]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()
