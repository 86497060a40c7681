"""Synthetic shapes data: captioned scenes of coloured shapes, a held-out split and an evaluator."""

from stable_cascade.shapes.dataset import (
    Scene,
    Shape,
    all_scenes,
    caption,
    held_out_prompts,
    parse_caption,
    render,
    split,
    write_dataset,
)
from stable_cascade.shapes.evaluate import Detection, Score, detect, detect_background, score, score_by_kind

__all__ = [
    "Detection",
    "Scene",
    "Score",
    "Shape",
    "all_scenes",
    "caption",
    "detect",
    "detect_background",
    "held_out_prompts",
    "parse_caption",
    "render",
    "score",
    "score_by_kind",
    "split",
    "write_dataset",
]
