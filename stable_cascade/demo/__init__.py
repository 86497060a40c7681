"""The demo cascade: a small Stable Cascade trained on synthetic shapes, shipped with the package.

``stable-cascade generate "a blue square on the right, on a black background" --model demo`` uses
it offline; :func:`train_demo` retrains it from scratch (``stable-cascade train demo OUT``) and
:func:`evaluate_demo` scores its prompt adherence on held-out prompts. The functions load on first
use, so the command line's parser reads :class:`Recipe` without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stable_cascade.demo.settings import DEMO_SIZE, Recipe

if TYPE_CHECKING:
    from stable_cascade.demo.recipe import evaluate_demo, load_demo, train_demo, train_demo_lcm

_LAZY = ("evaluate_demo", "load_demo", "train_demo", "train_demo_lcm")


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'stable_cascade.demo' has no attribute {name!r}")
    return getattr(importlib.import_module("stable_cascade.demo.recipe"), name)


__all__ = ["DEMO_SIZE", "Recipe", "evaluate_demo", "load_demo", "train_demo", "train_demo_lcm"]
