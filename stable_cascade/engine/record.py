"""What every generated PNG carries, and reading it back.

Two text chunks: ``parameters``, the AUTOMATIC1111 "infotext" that image viewers and web UIs show
(:mod:`stable_cascade.fields.infotext`), and ``stable_cascade``, the JSON :class:`ImageRecord`: the job
that made the image (its fields by name, see :class:`~stable_cascade.engine.job.Job`), the image's
index in it and its seed, its size, the sha256 of the local model files and the package version.
Records of schemas 1 and 2 (this package's earlier layouts) and other tools' infotexts are read too.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections.abc import Mapping
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import PIL.Image
from PIL.PngImagePlugin import PngInfo

from stable_cascade.checkpoint.atomic import atomic_path
from stable_cascade.engine.job import Job
from stable_cascade.engine.legacy import parse_infotext, schema_1_record
from stable_cascade.engine.stored import kind_of
from stable_cascade.fields import infotext

INFOTEXT_KEY = "parameters"
JSON_KEY = "stable_cascade"
SCHEMA = 3


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
        if not isinstance(data, Mapping):
            raise ValueError(f"{source}: the record must be an object, got {kind_of(data)}")
        if data.get("schema") == 1:
            return cls(**schema_1_record(data, source))
        if data.get("schema") not in (2, SCHEMA):  # schema 2: the job's earlier, nested layout
            raise ValueError(f"{source}: unknown record schema {data.get('schema')!r}; expected {SCHEMA}")
        known = {"schema", "job", "index", "seed", "width", "height", "model_sha256", "version"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown key {unknown[0]!r} in the record")
        hashes = data.get("model_sha256", {})
        if not isinstance(hashes, Mapping) or not all(isinstance(v, str) for v in hashes.values()):
            raise ValueError(f"{source}: model_sha256 must be an object of sha256 texts")
        record = cls(
            job=Job.from_dict(data.get("job"), source),  # type: ignore[arg-type]  # checked there
            index=_int("index", data.get("index", 0), source),
            seed=_int("seed", data.get("seed", 0), source),
            width=_int("width", data.get("width", 0), source),
            height=_int("height", data.get("height", 0), source),
            model_sha256={str(k): v for k, v in hashes.items()},
            version=str(data.get("version", "unknown")),
        )
        if not 0 <= record.index < record.job.images or record.seed != record.job.seed + record.index:
            raise ValueError(f"{source}: image {record.index} with seed {record.seed} is not in its job")
        return record

    def infotext(self) -> str:
        """The AUTOMATIC1111-style ``parameters`` text."""
        return infotext.write(self.job.to_dict(), self.seed, self.version)


def _int(key: str, value: object, source: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{source}: {key} must be a whole number, got {kind_of(value)}")
    return value


def png_info(record: ImageRecord) -> PngInfo:
    info = PngInfo()
    info.add_text(INFOTEXT_KEY, record.infotext())
    info.add_text(JSON_KEY, record.to_json())
    return info


def encode_png(image: PIL.Image.Image, record: ImageRecord) -> bytes:
    """``image`` as the bytes of a PNG carrying both text chunks (what :func:`save_png` writes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(record))
    return buffer.getvalue()


def save_png(image: PIL.Image.Image, path: str | Path, record: ImageRecord) -> None:
    """Write ``image`` as a PNG carrying both text chunks, atomically (a full disk leaves the old file)."""
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
    return record_of(chunks, str(path))


def record_of(chunks: Mapping[str, str], source: str) -> ImageRecord:
    """The record of an image's text chunks: the JSON record, else the parsed ``parameters`` text."""
    if JSON_KEY in chunks:
        return ImageRecord.from_json(chunks[JSON_KEY], f"the {JSON_KEY} record of {source}")
    if INFOTEXT_KEY in chunks:
        return ImageRecord(**parse_infotext(chunks[INFOTEXT_KEY], source))
    raise ValueError(f"{source} carries no generation parameters (no {JSON_KEY!r} or {INFOTEXT_KEY!r} text)")
