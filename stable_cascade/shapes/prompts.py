"""A shapes data set for learning image prompts (the demo's Stage C image phase and its IP-Adapter).

A shapes caption says everything the image shows, so next to its caption an image prompt adds nothing
that a model has to learn to read, and it does not. Here every example that has an image prompt gets a
text that leaves something to the image:

* ``variation``: an empty text; the image prompt is another rendering of the same scene (other jitter),
  so the output is to keep what the picture shows, not its pixels;
* ``recolour`` (one-object scenes): the image prompt shows the object in another colour, and the text
  names the colour the output has — the colour word alone, or (``whole_caption`` of them) the whole
  caption — so the image gives the shape and place, the text overrides the colour;
* ``text``: the caption and no image prompt, so that the text path keeps being trained.

The manifest is ``metadata.jsonl`` with ``image_prompt`` (see :mod:`stable_cascade.training.data`);
images are ``NNNNNN.png``, their prompts ``prompts/NNNNNN.png``. Example ``i`` depends on ``seed`` and
``i`` alone. Scenes are training scenes of the standard split only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from stable_cascade.shapes.dataset import COLOURS, Scene, Shape, caption, render, split

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PromptMix:
    """Shares of the example kinds (the rest: ``text``) and of whole captions among ``recolour``."""

    variation: float = 0.35
    recolour: float = 0.25
    whole_caption: float = 0.4

    def __post_init__(self) -> None:
        shares = (self.variation, self.recolour, self.whole_caption)
        if not all(0.0 <= share <= 1.0 for share in shares) or self.variation + self.recolour > 1.0:
            raise ValueError(
                f"image prompt shares must be in [0, 1] with variation + recolour <= 1; got {self}"
            )


#: How many colours :func:`recoloured` chooses from (all but the object's and the background's).
OTHER_COLOURS = len(COLOURS) - 2


def recoloured(scene: Scene, pick: int) -> Scene:
    """The one-object ``scene`` with its object in another colour, neither its own nor the background's:
    the ``pick``-th (modulo :data:`OTHER_COLOURS`) of the others in ``COLOURS`` order."""
    (obj,) = scene.objects
    others = [c for c in COLOURS if c not in (obj.colour, scene.background)]
    return Scene((Shape(obj.shape, others[pick % len(others)], obj.position),), scene.background)


def write_prompt_dataset(
    out_dir: str | Path, n_images: int, size: int = 128, seed: int = 0, mix: PromptMix = PromptMix()
) -> Path:
    """Write ``n_images`` examples (half one-object scenes) of the kinds in ``mix``; returns the folder."""
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1; got {n_images}")
    out = Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty folder; choose a new one")
    (out / "prompts").mkdir(parents=True)
    scenes = split()[0]
    singles = [s for s in scenes if len(s.objects) == 1]
    doubles = [s for s in scenes if len(s.objects) == 2]
    lines = []
    for index in tqdm(range(n_images), desc="image prompts", unit="image", disable=None):
        rng = np.random.default_rng((seed, index, 1))
        kind = rng.random()
        recolour = mix.variation <= kind < mix.variation + mix.recolour
        pool = singles if recolour or rng.random() < 0.5 else doubles
        scene = pool[rng.integers(len(pool))]
        shown = scene
        if kind < mix.variation:
            text = ""
        elif recolour:
            shown = recoloured(scene, int(rng.integers(OTHER_COLOURS)))
            text = caption(scene) if rng.random() < mix.whole_caption else scene.objects[0].colour
        else:
            text, shown = caption(scene), None  # type: ignore[assignment]
        name = f"{index:06d}.png"
        render(scene, size, rng).save(out / name, compress_level=1)
        entry = {"file_name": name, "text": text}
        if shown is not None:
            render(shown, size, rng).save(out / "prompts" / name, compress_level=1)
            entry["image_prompt"] = f"prompts/{name}"
        lines.append(json.dumps(entry))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    logger.info("wrote %d image prompt examples to %s", n_images, out)
    return out
