"""Training data: image + caption pairs from a folder, a JSONL manifest or webdataset-style tar shards,
grouped into aspect-ratio buckets and served in a seeded, resumable order.

Sources (:func:`find_examples`):

* a folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, searched recursively), each with a
  caption file of the same name and suffix ``.txt``;
* a ``.jsonl`` manifest (or a folder holding ``metadata.jsonl``) whose lines are objects with
  ``file_name`` (relative to the manifest) and ``text``, and optionally ``image_prompt``: another image
  (relative path) that is the example's image prompt (Stage C's CLIP image embedding, an IP-Adapter's
  input) instead of its own image, e.g. another view of the subject, or a picture whose colours the
  caption overrides;
* a ``.tar`` shard or a folder of them, webdataset layout: members ``key.png|jpg|…`` and ``key.txt``.

Buckets follow the original ``Bucketeer``: one size per aspect ratio with an area of about
``resolution²`` (sides multiples of ``multiple``); each image goes to the bucket nearest its aspect
ratio (in log space), is resized to cover it and center-cropped; a batch never mixes buckets.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import Tensor
from torch.utils.data import Dataset

from stable_cascade.checkpoint import parse_json
from stable_cascade.conditioning.image_files import open_image, open_image_bytes
from stable_cascade.conditioning.pixels import prepare_images

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MANIFEST = "metadata.jsonl"


@dataclasses.dataclass(frozen=True)
class ImageRef:
    """Where an image's bytes are: a file, or ``length`` bytes at ``offset`` inside a tar shard."""

    path: Path
    offset: int = -1  # -1: the whole file
    length: int = 0

    def read(self, load: bool = True) -> PIL.Image.Image:
        """The image (decoded unless ``load=False``); a ``ValueError`` naming it when it is unreadable or
        too large (:func:`open_image`)."""
        if self.offset < 0:
            return open_image(self.path, load=load)
        with open(self.path, "rb") as file:
            file.seek(self.offset)
            data = file.read(self.length)
        return open_image_bytes(data, f"{self.path} at byte {self.offset}", load=load)

    def size(self) -> tuple[int, int]:
        """(height, width) from the image header."""
        with self.read(load=False) as image:
            return image.height, image.width


@dataclasses.dataclass(frozen=True)
class Example:
    image: ImageRef
    caption: str
    prompt: ImageRef | None = None  # the image prompt, when it is not the image itself


def find_examples(path: Path) -> list[Example]:
    """Every (image, caption) pair of a data source, in a fixed order (sorted names)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"training data {path} does not exist; pass a folder of images with .txt captions, a .jsonl "
            "manifest or .tar shards"
        )
    if path.is_file():
        if path.suffix == ".jsonl":
            examples = _manifest_examples(path)
        elif path.suffix == ".tar":
            examples = _tar_examples([path])
        else:
            raise ValueError(f"{path} is neither a .jsonl manifest nor a .tar shard; pass one or a folder")
    elif (path / MANIFEST).is_file():
        examples = _manifest_examples(path / MANIFEST)
    elif shards := sorted(path.glob("*.tar")):
        examples = _tar_examples(shards)
    else:
        examples = _folder_examples(path)
    if not examples:
        raise ValueError(f"found no images in {path} (looked for {', '.join(IMAGE_SUFFIXES)})")
    return examples


def _folder_examples(root: Path) -> list[Example]:
    images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        shown = ", ".join(str(p.relative_to(root)) for p in missing[:3])
        raise ValueError(
            f"{len(missing)} of {len(images)} images in {root} have no caption file (the image's name with "
            f".txt), e.g. {shown}; add the captions (an empty .txt for none) or use a .jsonl manifest"
        )
    return [Example(ImageRef(p), _read_text(p.with_suffix(".txt")).strip()) for p in images]


def _read_text(path: Path) -> str:
    """A caption or manifest file, which must be UTF-8 (an error names the file otherwise)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text ({error}); save it as UTF-8") from None


def _manifest_examples(manifest: Path) -> list[Example]:
    examples = []
    for number, line in enumerate(_read_text(manifest).splitlines(), start=1):
        if not line.strip():
            continue
        entry = parse_json(line, f"{manifest}:{number}")
        if not isinstance(entry, dict) or not isinstance(entry.get("file_name"), str):
            raise ValueError(f'{manifest}:{number} needs a "file_name" string (the image, relative path)')
        if not isinstance(entry.get("text"), str):
            raise ValueError(f'{manifest}:{number} needs a "text" string (the caption)')
        image = _listed_file(manifest, number, entry["file_name"])
        prompt = entry.get("image_prompt")
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f'{manifest}:{number}: "image_prompt" must be a string (a relative path)')
        reference = ImageRef(_listed_file(manifest, number, prompt)) if prompt is not None else None
        examples.append(Example(ImageRef(image), entry["text"].strip(), reference))
    return examples


def _listed_file(manifest: Path, number: int, name: str) -> Path:
    path = manifest.parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{manifest}:{number} names {path}, which does not exist")
    return path


def _tar_examples(shards: Sequence[Path]) -> list[Example]:
    examples = []
    for shard in shards:
        images: dict[str, tarfile.TarInfo] = {}
        captions: dict[str, str] = {}
        try:
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if not member.isfile():
                        continue
                    folder, _, name = member.name.rpartition("/")
                    stem, _, suffix = name.partition(".")  # webdataset: the key ends at the first dot
                    key = f"{folder}/{stem}"
                    if f".{suffix.lower()}" in IMAGE_SUFFIXES:
                        images.setdefault(key, member)
                    elif suffix == "txt":
                        reader = tar.extractfile(member)
                        assert reader is not None  # a regular file
                        captions[key] = reader.read().decode("utf-8").strip()
        except tarfile.TarError as error:
            raise ValueError(f"{shard} is not a readable tar file: {error}") from error
        except UnicodeDecodeError as error:
            raise ValueError(f"{shard} holds a caption that is not UTF-8 text ({error})") from None
        missing = sorted(set(images) - set(captions))
        if missing:
            raise ValueError(
                f"{len(missing)} images in {shard} have no caption member (key.txt), e.g. "
                f"{', '.join(k.lstrip('/') for k in missing[:3])}"
            )
        for key in sorted(images):
            member = images[key]
            examples.append(Example(ImageRef(shard, member.offset_data, member.size), captions[key]))
    return examples


def bucket_sizes(resolution: int, ratios: Sequence[float], multiple: int) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio (w / h): area ≈ resolution², sides multiples of ``multiple``."""

    def side(value: float) -> int:
        return max(multiple, int(value // multiple) * multiple)

    return [(side(resolution / math.sqrt(r)), side(resolution * math.sqrt(r))) for r in ratios]


def nearest_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> int:
    """The bucket whose aspect ratio is nearest (in log space) to ``size`` = (height, width)."""
    ratio = math.log(size[1] / size[0])
    return min(range(len(buckets)), key=lambda i: abs(math.log(buckets[i][1] / buckets[i][0]) - ratio))


def group_by_bucket(examples: Sequence[Example], buckets: Sequence[tuple[int, int]]) -> list[list[int]]:
    """Example indices per bucket (the image headers are read only when there are several buckets)."""
    groups: list[list[int]] = [[] for _ in buckets]
    for index, example in enumerate(examples):
        groups[nearest_bucket(example.image.size(), buckets) if len(buckets) > 1 else 0].append(index)
    return groups


class BucketBatchSampler:
    """An endless stream of batches of example indices for one process, reproducible and resumable.

    Epoch ``e`` shuffles each bucket with ``numpy.random.default_rng([seed, e])``, fills its last batch
    by cycling, shuffles the batches, pads their number to a multiple of ``world_size`` and hands
    process ``rank`` every ``world_size``-th batch. Iteration starts at batch ``start`` of the stream,
    so resuming at step k continues with the batch an uninterrupted run would have used.
    """

    def __init__(
        self,
        groups: Sequence[Sequence[int]],
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        self.groups = [list(g) for g in groups if g]
        if not self.groups:
            raise ValueError("no examples to sample from")
        self.batch_size, self.seed = batch_size, seed
        self.rank, self.world_size, self.start = rank, world_size, start

    def epoch(self, epoch: int) -> list[list[int]]:
        """This process's batches of ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for group in self.groups:
            order = [group[i] for i in rng.permutation(len(group))]
            count = math.ceil(len(order) / self.batch_size) * self.batch_size
            order = [order[i % len(order)] for i in range(count)]
            batches.extend(order[i : i + self.batch_size] for i in range(0, count, self.batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        total = math.ceil(len(batches) / self.world_size) * self.world_size
        batches = [batches[i % len(batches)] for i in range(total)]
        return batches[self.rank :: self.world_size]

    def __len__(self) -> int:
        """Batches per epoch for this process."""
        return len(self.epoch(0))

    def __iter__(self) -> Iterator[list[int]]:
        per_epoch = len(self)
        epoch, offset = divmod(self.start, per_epoch)
        while True:
            yield from self.epoch(epoch)[offset:]
            epoch, offset = epoch + 1, 0


@dataclasses.dataclass
class Batch:
    images: Tensor  # (B, 3, H, W) in [0, 1]
    captions: list[str]
    prompts: Tensor  # (B, 3, H, W): each sample's image prompt, its own image where it names none
    prompted: Tensor  # (B,) bool: the samples whose example names an image prompt


Item = tuple[Tensor, str, Tensor | None]


class ImageCaptionDataset(Dataset[Item]):
    """Item i: example i's image resized to cover its bucket's size and center-cropped, its caption, and
    its image prompt (the same way) or ``None``."""

    def __init__(self, examples: Sequence[Example], sizes: Sequence[tuple[int, int]]) -> None:
        if len(examples) != len(sizes):
            raise ValueError(f"{len(examples)} examples but {len(sizes)} sizes")
        self.examples, self.sizes = list(examples), list(sizes)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, index: int) -> Item:
        example = self.examples[index]
        return (
            self._pixels(example.image, index),
            example.caption,
            (None if example.prompt is None else self._pixels(example.prompt, index)),
        )

    def _pixels(self, reference: ImageRef, index: int) -> Tensor:
        with reference.read() as image:
            return prepare_images(image, *self.sizes[index])[0]  # (3, H, W)


def collate(items: Sequence[Item]) -> Batch:
    images = torch.stack([image for image, _, _ in items])
    prompted = torch.tensor([prompt is not None for _, _, prompt in items])
    prompts = images
    if prompted.any():
        prompts = torch.stack([image if prompt is None else prompt for image, _, prompt in items])
    return Batch(images, [caption for _, caption, _ in items], prompts, prompted)


def bucketed_dataset(
    examples: Sequence[Example], resolution: int, ratios: Sequence[float], multiple: int
) -> tuple[ImageCaptionDataset, list[list[int]]]:
    """The dataset at the bucket sizes and the example indices per bucket."""
    sizes = bucket_sizes(resolution, ratios, multiple)
    groups = group_by_bucket(examples, sizes)
    per_example = [(0, 0)] * len(examples)
    for size, group in zip(sizes, groups, strict=True):
        for index in group:
            per_example[index] = size
        if group:
            logger.info("bucket %dx%d (h x w): %d images", size[0], size[1], len(group))
    return ImageCaptionDataset(examples, per_example), groups
