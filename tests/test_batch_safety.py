"""The batch output folder keeps what the user owns: a folder that is no batch output is refused, only the
run's own temporaries are deleted, a file that does not match its manifest's sha256 is made again, and
``--batch-size`` is checked like ``generate``'s, all before any model loads."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL.PngImagePlugin import PngInfo

from stable_cascade.batch import generate_batch, store
from stable_cascade.cli.main import main
from stable_cascade.engine import ModelSources

SETTINGS = {"models": ModelSources(model="demo"), "prior_steps": 2, "decoder_steps": 2}
FLAGS = ["--model", "demo", "--prior-steps", "2", "--decoder-steps", "2", "--seed", "7", "--no-progress"]


@pytest.fixture(autouse=True)
def no_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def prompts(tmp_path: Path) -> Path:
    path = tmp_path / "prompts.txt"
    path.write_text("a red circle\na blue square\n")
    return path


@pytest.fixture
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were loaded")

    monkeypatch.setattr("stable_cascade.engine.engine.load_models", refuse)
    monkeypatch.setattr("stable_cascade.batch.sampling.UnitRunner.run", refuse)


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


@pytest.mark.usefixtures("no_loading")
def test_a_folder_that_is_no_batch_output_is_refused(
    prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "holiday"
    out.mkdir()
    (out / "000000.png").write_bytes(b"the user's own picture")
    (out / "notes.txt").write_text("keep me")
    assert main(["batch", str(prompts), "-o", str(out), *FLAGS]) == 2
    assert errors(capsys) == [
        f"error: {out} holds files (000000.png, …) but is not a batch output (it has no batch.json); "
        "choose a new or empty folder for -o"
    ]
    assert sorted(os.listdir(out)) == ["000000.png", "notes.txt"]
    assert (out / "000000.png").read_bytes() == b"the user's own picture"


def test_a_run_deletes_only_its_own_temporaries(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate_batch(prompts, out, settings=SETTINGS, seed=7, progress=False)
    ours = [out / ".000001.png.0123456789ab.tmp", out / ".manifest.jsonl.4242.tmp"]  # killed writers'
    theirs = [out / ".draft.tmp", out / ".vacation.photo.tmp", out / "notes.tmp"]
    for path in [*ours, *theirs]:
        path.write_bytes(b"partial")
    summary = generate_batch(prompts, out, settings=SETTINGS, progress=False)
    assert summary.skipped == 2
    assert not any(path.exists() for path in ours) and all(path.exists() for path in theirs)


def test_a_file_that_does_not_match_its_sha256_is_made_again(prompts: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate_batch(prompts, out, settings=SETTINGS, seed=7, progress=False)
    made = (out / "000001.png").read_bytes()
    with PIL.Image.open(out / "000001.png") as image:  # pixels changed, the record kept
        info = PngInfo()
        for key, value in image.info.items():
            if isinstance(value, str):
                info.add_text(key, value)
        changed = image.convert("RGB")
    changed.putpixel((0, 0), tuple(255 - c for c in changed.getpixel((0, 0))))  # type: ignore[union-attr]
    changed.save(out / "000001.png", pnginfo=info)
    summary = generate_batch(prompts, out, settings=SETTINGS, progress=False)
    assert (summary.generated, summary.skipped) == (1, 1)
    assert (out / "000001.png").read_bytes() == made
    lines = [json.loads(line) for line in (out / store.MANIFEST).read_text().splitlines()]
    assert [line["file"] for line in lines] == ["000000.png", "000001.png"]


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize("size", ["-1", "65"])
def test_the_batch_size_is_checked_before_loading(
    size: str, prompts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["batch", str(prompts), "-o", str(tmp_path / "out"), *FLAGS, "--batch-size", size]) == 2
    assert errors(capsys) == [f"error: batch size must be between 1 and 64, got {size}"]
    for wrong in (0, 65, 2.0):
        with pytest.raises(ValueError, match="batch size must be"):
            generate_batch(prompts, tmp_path / "out", settings=SETTINGS, batch_size=wrong, progress=False)  # type: ignore[arg-type]
    assert not list((tmp_path / "out").glob("*.png"))


# -- processes -------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def launched(prompts: Path, out: Path, processes: int, *extra: str) -> list[str]:
    """The batch command, under ``torchrun --standalone`` for several processes."""
    launcher = [sys.executable, "-m", "stable_cascade"]
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node"]
        launcher += [str(processes), "-m", "stable_cascade"]
    return [*launcher, "batch", str(prompts), "-o", str(out), *FLAGS, *extra]


def environment(threads: str = "1") -> dict[str, str]:
    keep = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**keep, "OMP_NUM_THREADS": threads, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def items(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("items") / "items.txt"
    path.write_text(
        "".join(f"a {c} {s}\n" for c in ("red", "blue", "green") for s in ("circle", "star", "square"))
    )
    return path


@pytest.mark.slow
def test_two_processes_make_the_images_of_one_at_batch_size_four(items: Path, tmp_path: Path) -> None:
    """With the same CPU threads per process (see the README for why that matters)."""
    for processes in (1, 2):
        command = launched(items, tmp_path / str(processes), processes, "--batch-size", "4")
        subprocess.run(command, env=environment(), check=True, capture_output=True, timeout=300)
    one, two = (
        {p.name: np.asarray(PIL.Image.open(p)) for p in sorted((tmp_path / n).glob("*.png"))} for n in "12"
    )
    assert one.keys() == two.keys() and len(one) == 9
    assert all(np.array_equal(image, two[name]) for name, image in one.items())
    summary = json.loads((tmp_path / "2" / store.SUMMARY).read_text())
    assert summary["threads"] == [1, 1] and summary["batch_size"] == 4


def children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                found.append(int(stat.parent.name))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="workers end with their launcher on Linux")
def test_killing_torchrun_stops_its_workers(items: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    command = launched(items, out, 2, "--batch-size", "2", "--decoder-steps", "40", "--count", "2")
    run = subprocess.Popen(command, env=environment(), start_new_session=True, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not list(out.glob("*.png")) and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    workers = children(run.pid)
    assert len(workers) == 2, workers
    try:
        os.kill(run.pid, signal.SIGKILL)  # the launcher alone, as `kill -9 <torchrun>` does
        run.wait()
        deadline = time.monotonic() + 5  # left alone, they would go on for 20 s or more
        while any(running(w) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(running(w) for w in workers)
    finally:
        for worker in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker, signal.SIGKILL)
    assert len(list(out.glob("*.png"))) < 18  # they stopped: the set is not finished
