"""The demo cascade: a small Stable Cascade trained on synthetic shapes, shipped with the package.

``stable-cascade generate "a blue square on the right, on a black background" --model demo`` uses
it offline; :func:`train_demo` retrains it from scratch (``stable-cascade train demo OUT``) and
:func:`evaluate_demo` scores its prompt adherence on held-out prompts.
"""

from stable_cascade.demo.recipe import DEMO_SIZE, Recipe, evaluate_demo, load_demo, train_demo

__all__ = ["DEMO_SIZE", "Recipe", "evaluate_demo", "load_demo", "train_demo"]
