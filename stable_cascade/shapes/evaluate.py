"""Prompt adherence of shapes images: colour, shape and position detectors and a score against captions.

An image is resized to 128² and box-smoothed (3×3); its background is the median of its border; a
pixel is foreground when it is farther from the background than half the distance from the
background to the nearest other palette colour; objects are the 8-connected foreground components
above 0.4% of the image. An object's colour is the palette colour nearest to the median of its
interior; its shape follows from two rotation- and scale-invariant moments of its pixels (the third
order one is large only for a triangle, the fourth order one only for a square), so it survives blur,
noise, compression and rotated squares; its position is the anchor nearest to its centroid.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import PIL.Image

from stable_cascade.shapes.dataset import (
    ANCHORS,
    COLOURS,
    POSITIONS,
    RGB,
    Colour,
    Position,
    Scene,
    ShapeName,
    parse_caption,
)

WORK_SIZE = 128
MIN_AREA = 0.004  # of the image
MAX_OBJECTS = 6  # the largest components kept
#: |E z³| / E|z|²^1.5 and |E z⁴| / E|z|²² (z: centred pixel coordinates) of a filled equilateral
#: triangle and square; both are 0 for a disc, the first for a square, the second for a triangle.
TRIANGLE_MOMENT, SQUARE_MOMENT = 0.80, 0.60
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")

_ANCHORS = np.array([ANCHORS[p] for p in POSITIONS], dtype=np.float32)  # (5, 2) as (x, y)
_SHAPE_POINTS: dict[ShapeName, tuple[float, float]] = {"triangle": (1, 0), "circle": (0, 0), "square": (0, 1)}
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


@dataclasses.dataclass(frozen=True)
class Detection:
    """An object found in an image; ``centre`` (x, y) and ``area`` are fractions of the image."""

    colour: Colour
    shape: ShapeName
    position: Position
    centre: tuple[float, float]
    area: float
    triangularity: float  # 1 for a triangle, 0 for a circle or square
    squareness: float  # 1 for a square, 0 for a circle or triangle


@dataclasses.dataclass(frozen=True)
class Score:
    """Counts of correct attributes; an object's attributes come from its best-matching detection."""

    images: int = 0
    objects: int = 0
    colour: int = 0
    shape: int = 0
    position: int = 0
    whole: int = 0  # objects with colour, shape and position all right
    background: int = 0  # images
    count: int = 0  # images with exactly as many detections as objects

    def __add__(self, other: Score) -> Score:
        return Score(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    @property
    def attributes(self) -> float:
        """Fraction of object attributes (colour, shape, position) right: the headline number."""
        return (self.colour + self.shape + self.position) / max(1, 3 * self.objects)

    def summary(self) -> dict[str, float | int]:
        per_object = {k: getattr(self, k) / max(1, self.objects) for k in ("colour", "shape", "position")}
        per_image = {k: getattr(self, k) / max(1, self.images) for k in ("background", "count")}
        return {
            "images": self.images,
            "objects": self.objects,
            "attributes": self.attributes,
            **per_object,
            "whole_objects": self.whole / max(1, self.objects),
            **per_image,
        }

    def __str__(self) -> str:
        s = self.summary()
        return (
            f"attributes {s['attributes']:.1%} (colour {s['colour']:.1%}, shape {s['shape']:.1%}, "
            f"position {s['position']:.1%}); whole objects {s['whole_objects']:.1%}; background "
            f"{s['background']:.1%}; object count {s['count']:.1%}; "
            f"{self.images} images, {self.objects} objects"
        )


def _pixels(image: PIL.Image.Image | np.ndarray) -> np.ndarray:
    """(WORK_SIZE, WORK_SIZE, 3) float32 in [0, 255] from a PIL image or an (H, W, 3) uint8/[0, 1] array."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"an image array must be (H, W, 3); got shape {image.shape}")
        if image.dtype != np.uint8:
            image = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB")
    if image.size != (WORK_SIZE, WORK_SIZE):
        shrinking = min(image.size) > WORK_SIZE
        method = PIL.Image.Resampling.BOX if shrinking else PIL.Image.Resampling.BILINEAR
        image = image.resize((WORK_SIZE, WORK_SIZE), method)
    return np.asarray(image, dtype=np.float32)


def _shifted(array: np.ndarray, fill: float | bool) -> list[np.ndarray]:
    """``array`` (H, W, ...) shifted to each of its 8 neighbours, padded with ``fill``."""
    h, w = array.shape[:2]
    padded = np.full((h + 2, w + 2, *array.shape[2:]), fill, dtype=array.dtype)
    padded[1:-1, 1:-1] = array
    return [padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] for dy, dx in _NEIGHBOURS]


def _smooth(pixels: np.ndarray) -> np.ndarray:
    """The 3×3 mean of (H, W, 3) pixels, edges repeated."""
    padded = np.pad(pixels, [(1, 1), (1, 1), (0, 0)], mode="edge")
    h, w = pixels.shape[:2]
    return np.mean([padded[dy : dy + h, dx : dx + w] for dy in range(3) for dx in range(3)], axis=0)


def _erode(mask: np.ndarray) -> np.ndarray:
    return mask & np.logical_and.reduce(_shifted(mask, False))


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected components of ``mask`` (H, W) as boolean masks, largest first."""
    h, w = mask.shape
    none = h * w
    labels = np.where(mask, np.arange(none).reshape(h, w), none)  # a pixel's label: the smallest index
    while True:
        merged = np.minimum(labels, np.minimum.reduce(_shifted(labels, none)))
        merged = np.where(mask, merged, none)
        flat = merged.reshape(-1)
        inside = flat < none
        for _ in range(2):  # pointer jumping: a label is a pixel of the same component, with a label ≤ it
            flat[inside] = flat[flat[inside]]
        if np.array_equal(merged, labels):
            break
        labels = merged
    values, counts = np.unique(labels[mask], return_counts=True)
    return [labels == v for v in values[np.argsort(-counts, kind="stable")]]


def _nearest(colour: np.ndarray, candidates: Sequence[Colour]) -> Colour:
    distances = [float(np.linalg.norm(colour - np.array(RGB[c]))) for c in candidates]
    return candidates[int(np.argmin(distances))]


def _symmetry(xs: np.ndarray, ys: np.ndarray) -> tuple[float, float]:
    """(triangularity, squareness) of a shape's pixels: rotation- and scale-invariant complex moments."""
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())
    spread = float(np.mean(np.abs(z) ** 2)) + 1e-9
    return (
        float(abs(np.mean(z**3))) / spread**1.5 / TRIANGLE_MOMENT,
        float(abs(np.mean(z**4))) / spread**2 / SQUARE_MOMENT,
    )


def _analyse(image: PIL.Image.Image | np.ndarray) -> tuple[Colour, list[Detection]]:
    """The background colour and the objects of an image (see the module's docstring)."""
    pixels = _pixels(image)
    edges = (pixels[:2], pixels[-2:], pixels[:, :2], pixels[:, -2:])  # a 2-pixel border
    background_rgb = np.median(np.concatenate([e.reshape(-1, 3) for e in edges]), axis=0)
    background = _nearest(background_rgb, COLOURS)
    others = [c for c in COLOURS if c != background]
    threshold = 0.5 * min(float(np.linalg.norm(np.array(RGB[c]) - background_rgb)) for c in others)
    foreground = np.linalg.norm(_smooth(pixels) - background_rgb, axis=-1) > threshold
    detections = []
    for mask in _components(foreground)[:MAX_OBJECTS]:
        area = int(mask.sum())
        if area < MIN_AREA * mask.size:
            break
        interior = _erode(_erode(mask))
        colour = _nearest(np.median(pixels[interior if interior.sum() >= 4 else mask], axis=0), others)
        ys, xs = np.nonzero(mask)
        moments = _symmetry(xs, ys)  # (triangularity, squareness)
        shape = min(_SHAPE_POINTS, key=lambda k: np.hypot(*np.subtract(_SHAPE_POINTS[k], moments)))
        centre = (float(xs.mean() + 0.5) / mask.shape[1], float(ys.mean() + 0.5) / mask.shape[0])
        position = POSITIONS[int(np.argmin(np.linalg.norm(_ANCHORS - np.array(centre), axis=1)))]
        detections.append(Detection(colour, shape, position, centre, area / mask.size, *moments))
    return background, detections


def detect(image: PIL.Image.Image | np.ndarray) -> list[Detection]:
    """The objects in an image, largest first."""
    return _analyse(image)[1]


def detect_background(image: PIL.Image.Image | np.ndarray) -> Colour:
    """The palette colour of an image's border."""
    return _analyse(image)[0]


def _score_one(scene: Scene, background: Colour, detections: list[Detection]) -> Score:
    """The score of one image under the matching of objects to detections with most attributes right."""
    n = len(scene.objects)

    def matched(chosen: tuple[Detection | None, ...]) -> Score:
        right = [
            (d.colour == o.colour, d.shape == o.shape, d.position == o.position) if d else (False,) * 3
            for o, d in zip(scene.objects, chosen, strict=True)
        ]
        colour, shape, position = (sum(column) for column in zip(*right, strict=True))
        whole = sum(all(r) for r in right)
        same = (background == scene.background, len(detections) == n)
        return Score(1, n, colour, shape, position, whole, *map(int, same))

    candidates = [*detections, *([None] * n)]  # None: the object is missing
    matchings = (matched(chosen) for chosen in itertools.permutations(candidates, n))
    return max(matchings, key=lambda s: (s.colour + s.shape + s.position, s.whole))


def _scenes(
    images: Iterable[PIL.Image.Image | np.ndarray], prompts: Iterable[str]
) -> Iterator[tuple[PIL.Image.Image | np.ndarray, Scene]]:
    for count, (image, prompt) in enumerate(itertools.zip_longest(images, prompts)):
        if image is None or prompt is None:
            more = "prompts" if image is None else "images"
            raise ValueError(f"more {more} than the {count} pairs; give one prompt per image")
        yield image, parse_caption(prompt)


def score_by_kind(images: Iterable[PIL.Image.Image | np.ndarray], prompts: Iterable[str]) -> dict[str, Score]:
    """Scores of the one-object ("single") and two-object ("double") prompts present, and of "all"."""
    scores: dict[str, Score] = {}
    for image, scene in _scenes(images, prompts):
        kind = "single" if len(scene.objects) == 1 else "double"
        scores[kind] = scores.get(kind, Score()) + _score_one(scene, *_analyse(image))
    ordered: dict[str, Score] = {kind: scores[kind] for kind in ("single", "double") if kind in scores}
    return {**ordered, "all": sum(ordered.values(), Score())}


def score(images: Iterable[PIL.Image.Image | np.ndarray], prompts: Iterable[str]) -> Score:
    """How well each image shows its prompt (a caption in the shapes grammar), over all of them."""
    return score_by_kind(images, prompts)["all"]


def read_folder(folder: str | Path) -> tuple[list[Path], list[str]]:
    """Images in ``folder`` and their captions: ``x.png`` (or .jpg, .webp) with ``x.txt``."""
    path = Path(folder)
    if not path.is_dir():
        raise ValueError(f"{path} is not a folder")
    images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {path}")
    prompts = []
    for image in images:
        text = image.with_suffix(".txt")
        if not text.is_file():
            raise ValueError(f"{image} has no caption file {text.name}")
        prompts.append(text.read_text().strip())
        try:
            parse_caption(prompts[-1])
        except ValueError as error:
            raise ValueError(f"{text}: {error}") from None
    return images, prompts


def score_folder(folder: str | Path) -> dict[str, Score]:
    """:func:`score_by_kind` of the captioned images in a folder (see :func:`read_folder`)."""
    paths, prompts = read_folder(folder)
    return score_by_kind((_load(path) for path in paths), prompts)


def _load(path: Path) -> PIL.Image.Image:
    try:
        with PIL.Image.open(path) as image:
            return image.convert("RGB")
    except (
        PIL.Image.DecompressionBombError,
        PIL.UnidentifiedImageError,
    ) as error:  # too large / not an image
        raise ValueError(f"cannot score {path}: {error}") from None
