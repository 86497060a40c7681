"""The library's one-way layering (README, "Layout"), checked on every library module's imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "stable_cascade"

# Each layer may import only the layers listed for it (and itself).
_MODELS = {"specs", "checkpoint", "nn", "diffusion", "conditioning", "convert", "lora"}
# ``limits`` (bounds on config values and on a generation) is the bottom layer: every layer may import it.
ALLOWED: dict[str, set[str]] = {
    "limits": set(),
    "specs": {"limits"},
    "checkpoint": {"specs"},
    "convert": {"specs", "checkpoint"},
    "nn": {"specs", "checkpoint", "convert"},
    "diffusion": {"specs", "checkpoint"},
    "sampling": {"specs", "checkpoint", "convert", "nn", "diffusion"},
    "conditioning": {"specs", "checkpoint"},
    "lora": {"specs", "checkpoint", "nn"},
    "shapes": set(),
    "loading": _MODELS,
    "pipelines": _MODELS | {"sampling", "loading"},
    "training": _MODELS | {"sampling", "loading", "pipelines", "shapes"},
    "engine": _MODELS | {"sampling", "loading", "pipelines"},
    "demo": _MODELS | {"sampling", "loading", "pipelines", "shapes", "training", "engine"},
    "server": _MODELS | {"loading", "pipelines", "engine"},
    "batch": _MODELS | {"loading", "pipelines", "engine"},
    "cli": _MODELS | {"loading", "pipelines", "shapes", "training", "demo", "engine", "server", "batch"},
}
for _layer, _imports in ALLOWED.items():
    if _layer != "limits":
        _imports.add("limits")
MODULES = sorted(p for p in PACKAGE.rglob("*.py"))


def layer_of(path: Path) -> str:
    top = path.relative_to(PACKAGE).with_suffix("").parts[0]
    return "cli" if top == "__main__" else top


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path: Path) -> None:
    layer = layer_of(path)
    imported = imported_modules(path)
    assert not any(name.split(".")[0] == "diffusers" for name in imported), (
        "diffusers is a test-only reference"
    )
    if layer == "__init__":
        return
    assert layer in ALLOWED, f"{path} is in no known layer; add it to ALLOWED"
    ours = {name.split(".")[1] for name in imported if name.startswith("stable_cascade.")}
    forbidden = ours - ALLOWED[layer] - {layer}
    assert not forbidden, f"{path} ({layer}) must not import {sorted(forbidden)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_library_files_stay_small_and_print_free(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= 400, f"{path} is over 400 lines: split it"
    calls = [n for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Call)]
    prints = [n for n in calls if isinstance(n.func, ast.Name) and n.func.id == "print"]
    if layer_of(path) != "cli":
        assert not prints, f"{path} prints; use logging in the library"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    root = PACKAGE.parent
    command = (root / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert command in (root / "README.md").read_text()
    assert "pytest" in command and command.startswith("pip install torch==2.13.0")
