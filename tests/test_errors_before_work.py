"""Mistakes found before any work, each in one line: sizes too small for any cascade, a device this
machine lacks, output patterns with other fields, ``--components`` that would do nothing, and a Hub
that cannot be reached (one try, not five retries)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch

from stable_cascade.checkpoint import files
from stable_cascade.cli.main import main
from stable_cascade.engine import Job, ModelSources

DEMO = ["--model", "demo", "--device", "cpu", "--prior-steps", "2", "--decoder-steps", "2", "--seed", "3"]


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    err = capsys.readouterr().err
    return code, [line for line in err.splitlines() if line.strip() and "it/s" not in line]


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were loaded")

    monkeypatch.setattr("stable_cascade.engine.engine.load_models", refuse)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (["--width", "8"], "width must be at least 32 pixels, got 8"),
        (["--height", "24", "--width", "64"], "height must be at least 32 pixels, got 24"),
        (["--width", "20"], "width must be a multiple of 8 pixels, got 20; try 32"),
        (["-o", "{out}/{seed.real}.png"], "has {seed.real}; its placeholders are {seed}, {index}, {prompt}"),
        (["-o", "{out}/{0}.png"], "has {0}; its placeholders are"),
    ],
)
def test_generate_mistakes_are_one_line_before_loading(
    extra: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["generate", "a cat", *DEMO, "-o", tmp_path / "x.png"]
    code, lines = run([*argv, *(a.replace("{out}", str(tmp_path)) for a in extra)], capsys)
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_sizes_too_small_for_any_cascade_are_refused_by_the_job() -> None:
    with pytest.raises(ValueError, match="width must be at least 32 pixels, got 16"):
        Job.create(prompt="x", width=16, height=128, models=ModelSources(model="demo"))
    assert Job.create(prompt="x", width=32, height=32, models=ModelSources(model="demo")).width == 32


@pytest.mark.usefixtures("no_loading")
@pytest.mark.skipif(torch.backends.mps.is_available(), reason="this machine has MPS")
def test_a_device_this_machine_lacks_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = run(["generate", "x", *DEMO, "--device", "mps", "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and lines == [
        "error: device 'mps' asked for, but mps is not available here; use the CPU"
    ]
    assert os.listdir(tmp_path) == []


def test_components_that_would_do_nothing_are_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "clip").mkdir()
    argv = ["generate", "x", *DEMO, "--components", tmp_path / "clip", "-o", tmp_path / "x.png"]
    code, lines = run(argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert (
        lines[0].startswith(f"error: --components {tmp_path / 'clip'} would do nothing")
        and "drop it" in lines[0]
    )
    assert sorted(os.listdir(tmp_path)) == ["clip"]


@pytest.fixture
def unreachable_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The Hub at a port nothing listens on (no proxy), an empty cache, and HF_HUB_OFFLINE unset."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    files.hub_reachable.cache_clear()


@pytest.mark.usefixtures("unreachable_hub")
def test_an_unreachable_hub_fails_at_once(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as caught:
        files.resolve_file("stabilityai/stable-cascade-prior", "model_index.json")
    assert time.perf_counter() - start < 5  # huggingface_hub alone: five retries, about 30 s
    assert "the Hub (http://127.0.0.1:9) cannot be reached" in str(caught.value)
    start = time.perf_counter()
    code, lines = run(
        ["generate", "x", "--model", "lite", "--device", "cpu", "-o", tmp_path / "x.png"], capsys
    )
    assert time.perf_counter() - start < 5
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot load the 'lite' model") and "not in the local" in lines[0]
    files.hub_reachable.cache_clear()
