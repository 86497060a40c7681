"""The repository stands alone: no file points at documents or data outside it."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built from pieces so that this file does not match itself.
FORBIDDEN = re.compile(
    "|".join(
        [
            re.escape("../" + "shared"),
            re.escape("shared" + "/spec"),
            re.escape("STYLE" + ".md"),
            r"\bspec" + r" (section |§ ?)?\d",  # citations of an outside document's numbered sections
        ]
    ),
    re.IGNORECASE,
)
_BINARY = {".safetensors", ".png", ".gz", ".bin", ".pt"}


def tracked_files() -> list[Path]:
    """Every file git tracks (or, outside a checkout, every file below the root but caches)."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):
        skip = {".git", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", ".venv"}
        return [p for p in ROOT.rglob("*") if p.is_file() and not skip & set(p.relative_to(ROOT).parts)]
    return [ROOT / name for name in listed.split("\0") if name]


def test_no_file_refers_to_anything_outside_the_repository() -> None:
    files = [p for p in tracked_files() if p.suffix not in _BINARY and p.is_file()]
    assert any(p.name == "README.md" for p in files)
    offenders = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FORBIDDEN.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, "references to files outside the repository:\n" + "\n".join(offenders)


@pytest.mark.parametrize(
    "line",
    ["see ../" + "shared" + "/spec/x.json", "per STYLE" + ".md", "(spec" + " 7.2)", "spec" + " section 8"],
)
def test_the_check_catches_each_kind_of_reference(line: str) -> None:
    assert FORBIDDEN.search(line)
