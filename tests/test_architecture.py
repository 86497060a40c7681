"""The library's one-way layering (README, "Layout"; docs/ARCHITECTURE.md), checked on every library
module's imports: layers import only the layers below them (front ends: the engine and the field table
only), no module imports another module's private names, and no import loop exists anywhere, counting
imports inside functions and under TYPE_CHECKING too."""

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
    # The job field table: light (no torch), below the engine; it reads the presets, the named models
    # and the control types, which are light modules too (test_the_field_table_is_light).
    "fields": {"specs", "diffusion", "loading"},
    "engine": _MODELS | {"sampling", "loading", "pipelines", "fields"},
    "demo": _MODELS | {"sampling", "loading", "pipelines", "shapes", "training", "engine"},
    # Front ends: the engine and the field table only.
    "server": {"engine", "fields"},
    "batch": {"engine", "fields"},
    # The command line also fronts the tools: training, the demo, the shapes data, and loading's
    # conversion and inspection of checkpoint files.
    "cli": {"engine", "fields", "server", "batch", "training", "demo", "shapes", "loading"},
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


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULE_NAMES = {_module(path): path for path in MODULES}


def _resolve(name: str) -> str | None:
    """The package module ``name`` is (or is in), None outside the package."""
    while name and name not in MODULE_NAMES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(path: Path) -> list[tuple[str, str]]:
    """(module imported, name imported from it) for every import of the package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(module, "") for alias in node.names if (module := _resolve(alias.name))]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                module = full if full in MODULE_NAMES else _resolve(node.module)
                if module:
                    found.append((module, "" if module == full else alias.name))
    return found


def test_no_import_loops() -> None:
    graph = {name: {m for m, _ in _imports(path)} - {name} for name, path in MODULE_NAMES.items()}
    loops = []
    for start in graph:  # a depth-first search from each module back to itself
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for after in graph[node]:
                if after == start:
                    loops.append(" → ".join([*trail, start]))
                elif after not in seen:
                    seen.add(after)
                    stack.append((after, [*trail, after]))
    assert not loops, f"import loops: {loops[:3]}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    own = _module(path)
    private = [
        f"{name} from {module}"
        for module, name in _imports(path)
        if name.startswith("_") and not name.startswith("__") and module != own
    ]
    assert not private, f"{path} imports private names: {private}"


def test_the_field_table_is_light() -> None:
    """The command line parses its arguments from the field table: importing it loads no torch."""
    import subprocess
    import sys

    modules = "stable_cascade.fields.schema, stable_cascade.fields.infotext"
    code = f"import sys, {modules}; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
