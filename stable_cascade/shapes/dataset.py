"""Synthetic shapes scenes: their captions, their renders, the held-out split and a data set writer.

A scene is one or two coloured shapes at distinct positions on a plain background of another colour,
captioned in a fixed grammar::

    a red circle on the left, on a white background
    a red circle on the left and a blue square on the right, on a black background

Held-out rule (:func:`split`): a seeded choice of ``held_out_fraction`` of the (shape, colour,
position) triples is never drawn in training, in one- or two-object scenes; each such triple is
chosen only while every pair of its values (shape and colour, shape and position, colour and position)
is still in some training triple, so a held-out object is a new combination of pairs seen in training.
Of the pairs of training objects, ``held_out_fraction`` more are held out as pairs: each object
appears in training, never the two together. Backgrounds are not part of a combination.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import math
import re
from collections import Counter
from pathlib import Path
from typing import Literal, get_args

import numpy as np
import PIL.Image
import PIL.ImageDraw
from tqdm.auto import tqdm

from stable_cascade.limits import MAX_SEED

ShapeName = Literal["circle", "square", "triangle"]
Colour = Literal["red", "green", "blue", "yellow", "orange", "purple", "white", "black"]
Position = Literal["left", "right", "top", "bottom", "center"]
Split = Literal["train", "held-out"]
Triple = tuple[ShapeName, Colour, Position]

SHAPES: tuple[ShapeName, ...] = get_args(ShapeName)
COLOURS: tuple[Colour, ...] = get_args(Colour)
POSITIONS: tuple[Position, ...] = get_args(Position)
#: Well separated for a nearest-colour classifier: ≥ 110 apart in RGB (orange–red, orange–yellow).
RGB: dict[Colour, tuple[int, int, int]] = {
    "red": (220, 20, 30),
    "green": (30, 170, 50),
    "blue": (20, 60, 235),
    "yellow": (250, 230, 40),
    "orange": (250, 125, 0),
    "purple": (140, 30, 190),
    "white": (255, 255, 255),
    "black": (0, 0, 0),
}
#: Object centres as fractions (x, y) of the image side.
ANCHORS: dict[Position, tuple[float, float]] = {
    "left": (0.22, 0.5),
    "right": (0.78, 0.5),
    "top": (0.5, 0.22),
    "bottom": (0.5, 0.78),
    "center": (0.5, 0.5),
}
PHRASES: dict[Position, str] = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
#: Nominal object width as a fraction of the side, for one object and for two (which must not touch).
OBJECT_SIZE = {1: 0.28, 2: 0.20}
TRIANGLE_RADIUS = 0.55  # circumradius / nominal width: about the visual size of the circle and square
POSITION_JITTER = 0.015  # ± fraction of the side
SIZE_JITTER = 0.05  # ± relative
ROTATION_JITTER = 12.0  # ± degrees, triangles only
SUPERSAMPLE = 3  # drawn this many times larger, then box-filtered: antialiased edges
HELD_OUT_FRACTION = 0.1
SPLIT_SEED = 0

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One object of a scene."""

    shape: ShapeName
    colour: Colour
    position: Position

    def __post_init__(self) -> None:
        for value, allowed in ((self.shape, SHAPES), (self.colour, COLOURS), (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown shape attribute {value!r}; expected one of {', '.join(allowed)}")

    @property
    def triple(self) -> Triple:
        return (self.shape, self.colour, self.position)


@dataclasses.dataclass(frozen=True)
class Scene:
    """One or two objects at distinct positions on a background of a colour none of them has."""

    objects: tuple[Shape, ...]
    background: Colour

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if not 1 <= len(self.objects) <= 2:
            raise ValueError(f"a scene has one or two objects; got {len(self.objects)}")
        if len({o.position for o in self.objects}) != len(self.objects):
            raise ValueError(f"two objects {PHRASES[self.objects[0].position]}; give them distinct positions")
        if self.background not in COLOURS:
            raise ValueError(f"unknown background {self.background!r}; expected one of {', '.join(COLOURS)}")
        if self.background in {o.colour for o in self.objects}:
            raise ValueError(
                f"a {self.background} object on a {self.background} background would be invisible"
            )

    @property
    def combination(self) -> frozenset[Triple]:
        """The objects' triples, without order or background: what the held-out rule is about."""
        return frozenset(o.triple for o in self.objects)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene) -> str:
    """``a red circle on the left[ and a blue square on the right], on a white background``."""
    described = [f"{_article(o.colour)} {o.colour} {o.shape} {PHRASES[o.position]}" for o in scene.objects]
    return f"{' and '.join(described)}, on {_article(scene.background)} {scene.background} background"


_OBJECT = (
    rf"an? ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) "
    rf"({'|'.join(PHRASES[p] for p in POSITIONS)})"
)
_CAPTION = re.compile(rf"{_OBJECT}(?: and {_OBJECT})?, on an? ({'|'.join(COLOURS)}) background")
_POSITION_OF = {phrase: position for position, phrase in PHRASES.items()}


def parse_caption(text: str) -> Scene:
    """The scene a caption describes; ignores case, extra spaces and a final full stop."""
    normal = " ".join(text.lower().split()).removesuffix(".")
    match = _CAPTION.fullmatch(normal)
    if match is None:
        raise ValueError(
            f"{text!r} is not a shapes caption; expected e.g. 'a red circle on the left, on a white "
            "background' or 'a red circle on the left and a blue square on the right, on a black "
            f"background' (colours: {', '.join(COLOURS)}; shapes: {', '.join(SHAPES)}; positions: "
            f"{', '.join(PHRASES.values())})"
        )
    groups = match.groups()
    objects = tuple(
        Shape(shape=shape, colour=colour, position=_POSITION_OF[phrase])  # type: ignore[arg-type]
        for colour, shape, phrase in (groups[0:3], groups[3:6])
        if colour is not None
    )
    return Scene(objects, background=groups[6])  # type: ignore[arg-type]


def render(scene: Scene, size: int = 128, rng: np.random.Generator | None = None) -> PIL.Image.Image:
    """An RGB image of the scene; ``rng`` jitters position, size and a triangle's rotation (none if None)."""
    _check_size(size)
    big = size * SUPERSAMPLE
    image = PIL.Image.new("RGB", (big, big), RGB[scene.background])
    draw = PIL.ImageDraw.Draw(image)
    nominal = OBJECT_SIZE[len(scene.objects)]
    for obj in scene.objects:
        # Four draws per object whatever its shape, so the stream stays aligned across scenes.
        dx, dy, ds, da = rng.uniform(-1.0, 1.0, size=4) if rng is not None else (0.0, 0.0, 0.0, 0.0)
        x, y = ANCHORS[obj.position]
        cx, cy = (x + dx * POSITION_JITTER) * big, (y + dy * POSITION_JITTER) * big
        half = nominal / 2 * (1 + ds * SIZE_JITTER) * big
        fill = RGB[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=fill)
        elif obj.shape == "square":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=fill)
        else:  # apex up, rotated about the centroid
            radius = 2 * TRIANGLE_RADIUS * half
            angles = [math.radians(-90 + da * ROTATION_JITTER + 120 * k) for k in range(3)]
            draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=fill)
    return image.resize((size, size), PIL.Image.Resampling.BOX)


MIN_SIZE, MAX_SIZE = 16, 2048  # pixels per side (drawn at SUPERSAMPLE times that, then reduced)
MAX_IMAGES = 1_000_000


def _check_size(size: int) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not MIN_SIZE <= size <= MAX_SIZE:
        raise ValueError(f"size must be a whole number of pixels from {MIN_SIZE} to {MAX_SIZE}; got {size!r}")


def _check_make(n_images: int, size: int, seed: int, two_object_fraction: float, split: str) -> None:
    """The arguments of :func:`write_dataset`, each error one line saying what is accepted."""
    if isinstance(n_images, bool) or not isinstance(n_images, int) or not 1 <= n_images <= MAX_IMAGES:
        raise ValueError(f"the image count must be a whole number from 1 to {MAX_IMAGES:,}; got {n_images!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1; got {seed!r}")
    fraction = two_object_fraction
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction <= 1:
        raise ValueError(f"two_object_fraction must be a number in [0, 1]; got {fraction!r}")
    if split not in get_args(Split):
        raise ValueError(f"split must be 'train' or 'held-out'; got {split!r}")
    _check_size(size)


def _scene(triples: tuple[Triple, ...], background: Colour) -> Scene:
    ordered = sorted(triples, key=lambda t: POSITIONS.index(t[2]))
    return Scene(tuple(Shape(*t) for t in ordered), background)


def _backgrounds(triples: tuple[Triple, ...]) -> list[Colour]:
    return [c for c in COLOURS if c not in {t[1] for t in triples}]


def _pairs(triples: list[Triple]) -> list[tuple[Triple, Triple]]:
    return [(a, b) for a, b in itertools.combinations(triples, 2) if a[2] != b[2]]


@functools.lru_cache(maxsize=4)
def all_scenes(n_objects: int | None = None) -> tuple[Scene, ...]:
    """Every scene with ``n_objects`` objects (1, 2, or None for both), two-object ones left to right."""
    if n_objects not in (1, 2, None):
        raise ValueError(f"n_objects must be 1, 2 or None; got {n_objects!r}")
    triples: list[Triple] = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    groups: list[tuple[Triple, ...]] = []
    if n_objects in (1, None):
        groups += [(t,) for t in triples]
    if n_objects in (2, None):
        groups += _pairs(triples)
    return tuple(_scene(g, b) for g in groups for b in _backgrounds(g))


def _held_out_triples(rng: np.random.Generator, fraction: float) -> list[Triple]:
    triples: list[Triple] = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    target = round(fraction * len(triples))

    def pairs_of(t: Triple) -> list[tuple[str | None, ...]]:
        return [(t[0], t[1], None), (t[0], None, t[2]), (None, t[1], t[2])]

    in_training = Counter(p for t in triples for p in pairs_of(t))
    held: list[Triple] = []
    for index in rng.permutation(len(triples)):
        if len(held) == target:
            break
        triple = triples[index]
        if all(in_training[p] > 1 for p in pairs_of(triple)):
            held.append(triple)
            in_training.subtract(pairs_of(triple))
    if len(held) < target:
        raise ValueError(
            f"held_out_fraction {fraction} is too large: only {len(held)} of {len(triples)} combinations "
            "can be held out while every pair of attribute values stays in training"
        )
    return held


@functools.lru_cache(maxsize=4)
def split(
    seed: int = SPLIT_SEED, held_out_fraction: float = HELD_OUT_FRACTION
) -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    """(training scenes, held-out scenes) by the held-out rule in this module's docstring.

    Held-out scenes: each held-out triple on every background, each held-out pair on one seeded
    background. Two-object scenes with a held-out triple are in neither set.
    """
    if not 0 <= held_out_fraction <= 0.5:
        raise ValueError(f"held_out_fraction must be in [0, 0.5]; got {held_out_fraction}")
    rng = np.random.default_rng(seed)
    triples: list[Triple] = list(itertools.product(SHAPES, COLOURS, POSITIONS))
    held_triples = set(_held_out_triples(rng, held_out_fraction))
    pairs = _pairs([t for t in triples if t not in held_triples])
    held_pairs = set(map(int, rng.choice(len(pairs), round(held_out_fraction * len(pairs)), replace=False)))
    train: list[Scene] = []
    held_out: list[Scene] = []
    for triple in triples:
        group = (triple,)
        (held_out if triple in held_triples else train).extend(_scene(group, b) for b in _backgrounds(group))
    for index, pair in enumerate(pairs):
        backgrounds = _backgrounds(pair)
        if index in held_pairs:
            held_out.append(_scene(pair, backgrounds[rng.integers(len(backgrounds))]))
        else:
            train.extend(_scene(pair, b) for b in backgrounds)
    return tuple(train), tuple(held_out)


def held_out_prompts(kind: Literal["single", "double"] = "single") -> list[str]:
    """The captions of the held-out scenes with one object ("single") or two ("double")."""
    if kind not in ("single", "double"):
        raise ValueError(f"kind must be 'single' or 'double'; got {kind!r}")
    n_objects = 1 if kind == "single" else 2
    return [caption(s) for s in split()[1] if len(s.objects) == n_objects]


def write_dataset(
    out_dir: str | Path,
    n_images: int,
    size: int = 128,
    seed: int = 0,
    two_object_fraction: float = 0.5,
    split: Split = "train",
) -> Path:
    """``000000.png`` + ``000000.txt`` (its caption) pairs and a ``metadata.jsonl`` manifest.

    Scenes come from the standard :func:`split` (seed 0); ``seed`` picks the scenes and jitter only.
    Image ``i`` depends on ``seed`` and ``i`` alone, so a larger data set extends a smaller one.
    """
    _check_make(n_images, size, seed, two_object_fraction, split)
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new one")
    scenes = _standard_split()[0 if split == "train" else 1]
    singles = [s for s in scenes if len(s.objects) == 1]
    doubles = [s for s in scenes if len(s.objects) == 2]
    out.mkdir(parents=True, exist_ok=True)
    width = max(6, len(str(n_images - 1)))
    lines = []
    for index in tqdm(range(n_images), desc="shapes", unit="image", disable=None):
        rng = np.random.default_rng((seed, index))
        pool = doubles if rng.random() < two_object_fraction else singles
        scene = pool[rng.integers(len(pool))]
        text = caption(scene)
        stem = f"{index:0{width}d}"
        render(scene, size, rng).save(out / f"{stem}.png", compress_level=1)
        (out / f"{stem}.txt").write_text(text + "\n")
        lines.append(json.dumps({"file_name": f"{stem}.png", "text": text}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    logger.info("wrote %d %s images to %s", n_images, split, out)
    return out


def _standard_split() -> tuple[tuple[Scene, ...], tuple[Scene, ...]]:
    return split()  # the parameter ``split`` of write_dataset hides the function
