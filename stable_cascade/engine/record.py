"""What every generated PNG carries, and reading it back.

Two text chunks: ``parameters``, the AUTOMATIC1111 "infotext" that image viewers and web UIs show::

    a photo of a cat
    Negative prompt: blurry
    Steps: 20+10, Sampler: ddpm, CFG scale: 4.0+1.1, Seed: 42, Size: 1024x1024, Model: full, ...

(Stage C and Stage B values joined by ``+``), and ``stable_cascade``, the JSON :class:`ImageRecord`:
the job that made the image (see :class:`~stable_cascade.engine.job.Job`), the image's index in it and
its seed, its size, the sha256 of the local model files and the package version. Records of schema 1
(this package's earlier flat layout) and other tools' infotexts are read too.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from stable_cascade.engine.decoding import _object, _typed
from stable_cascade.engine.job import Job, StageJob
from stable_cascade.engine.legacy import parse_infotext, schema_1_record
from stable_cascade.loading.sources import ModelSources

INFOTEXT_KEY = "parameters"
JSON_KEY = "stable_cascade"
SCHEMA = 2


def package_version() -> str:
    try:
        return importlib_metadata.version("stable-cascade")
    except importlib_metadata.PackageNotFoundError:
        return "unknown"


@dataclasses.dataclass(frozen=True)
class ImageRecord:
    """One image of a job: the job, the image's index in it, its seed (``job.seed + index``) and size."""

    job: Job
    index: int = 0
    seed: int = 0
    width: int = 0
    height: int = 0
    model_sha256: Mapping[str, str] = dataclasses.field(default_factory=dict)  # role → digest
    version: str = dataclasses.field(default_factory=package_version)

    def single_job(self) -> Job:
        """The job that makes this image alone (its seed, one image)."""
        return dataclasses.replace(self.job, seed=self.seed, batch_size=1, count=1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "job": self.job.to_dict(),
            "index": self.index,
            "seed": self.seed,
            "width": self.width,
            "height": self.height,
            "model_sha256": dict(self.model_sha256),
            "version": self.version,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str = "the JSON record") -> ImageRecord:
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as error:
            raise ValueError(f"{source} is not a valid {JSON_KEY} record: {error}") from None
        data = _object("the record", data, source)
        if data.get("schema") == 1:
            return cls(**schema_1_record(data, source))
        if data.get("schema") != SCHEMA:
            raise ValueError(f"{source}: unknown record schema {data.get('schema')!r}; expected {SCHEMA}")
        known = {"schema", "job", "index", "seed", "width", "height", "model_sha256", "version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r} in the record")
        hashes = _object("model_sha256", data.get("model_sha256", {}), source)
        record = cls(
            job=Job.from_dict(_object("job", data.get("job"), source), source),
            index=_typed("index", data.get("index", 0), "int", source),
            seed=_typed("seed", data.get("seed", 0), "int", source),
            width=_typed("width", data.get("width", 0), "int", source),
            height=_typed("height", data.get("height", 0), "int", source),
            model_sha256={str(k): _typed(f"model_sha256.{k}", v, "str", source) for k, v in hashes.items()},
            version=_typed("version", data.get("version", "unknown"), "str", source),
        )
        if not 0 <= record.index < record.job.images or record.seed != record.job.seed + record.index:
            raise ValueError(f"{source}: image {record.index} with seed {record.seed} is not in its job")
        return record

    def infotext(self) -> str:
        """The AUTOMATIC1111-style ``parameters`` text."""
        job = self.job
        stages: list[StageJob] = [s for s in (job.prior, job.decoder) if s is not None]
        fields: dict[str, object] = {
            "Steps": _joined(s.steps for s in stages),
            "Sampler": _joined(dict.fromkeys(s.sampler for s in stages)),  # one name when equal
            "CFG scale": _joined(s.guidance for s in stages),
            "Seed": self.seed,
            "Size": f"{self.width}x{self.height}",
            "Model": model_label(job.models, ("prior", "decoder") if job.prior else ("decoder",)),
            "Preset": job.preset,
            "Shift": _joined(s.shift for s in stages if s is stages[0] or s.shift != 1.0),
        }
        if job.strength is not None:
            fields["Denoising strength"] = job.strength
        if job.task != "txt2img":
            fields["Task"] = job.task
        if job.loras:
            fields["Lora"] = _joined(f"{Path(lora.path).stem}:{lora.scale:g}" for lora in job.loras)
        for control in job.controls:
            fields["ControlNet"] = Path(control.controlnet).stem
            fields["Control type"] = control.control_type
            fields["Control scale"] = f"{control.scale:g}"
        fields["Version"] = f"stable-cascade {self.version}"
        lines = [job.prompt]
        if job.negative_prompt:
            lines.append(f"Negative prompt: {job.negative_prompt}")
        lines.append(", ".join(f"{k}: {_quoted(v)}" for k, v in fields.items()))
        return "\n".join(lines)


def model_label(models: ModelSources, roles: tuple[str, ...] = ("prior", "decoder")) -> str:
    """A short name for the models: the bundle name, or the last parts of the prior and decoder."""
    bundle = models.model
    stages = [getattr(models, role) for role in roles]
    if bundle and not any(stages):
        return bundle
    names = [Path(s).name if s else bundle or "default" for s in stages]
    return " + ".join(names)


def _joined(values: Any) -> str:
    return "+".join(str(v) for v in values)


def _quoted(value: object) -> str:
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


def png_info(record: ImageRecord) -> PngInfo:
    info = PngInfo()
    info.add_text(INFOTEXT_KEY, record.infotext())
    info.add_text(JSON_KEY, record.to_json())
    return info


def save_png(image: PIL.Image.Image, path: str | Path, record: ImageRecord) -> None:
    """Write ``image`` as a PNG carrying both text chunks, atomically (a full disk leaves the old file)."""
    from stable_cascade.checkpoint.atomic import atomic_path

    with atomic_path(path) as temporary:
        image.save(temporary, format="PNG", pnginfo=png_info(record))


def read_png(path: str | Path) -> ImageRecord:
    """The record stored in an image: the JSON record, else the parsed ``parameters`` text."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with PIL.Image.open(path) as image:
            chunks = {str(k): v for k, v in image.info.items() if isinstance(v, str)}
    except (PIL.UnidentifiedImageError, OSError) as error:
        raise ValueError(f"{path} is not a readable image: {error}") from error
    if JSON_KEY in chunks:
        return ImageRecord.from_json(chunks[JSON_KEY], f"the {JSON_KEY} record of {path}")
    if INFOTEXT_KEY in chunks:
        return ImageRecord(**parse_infotext(chunks[INFOTEXT_KEY], str(path)))
    raise ValueError(f"{path} carries no generation parameters (no {JSON_KEY!r} or {INFOTEXT_KEY!r} text)")
