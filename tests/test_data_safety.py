"""Nothing a user owns is lost: every file is written atomically (a full disk leaves the old file and no
part of the new one), two runs writing into one folder never take one name, and nothing is replaced
without ``--overwrite`` (previews, finished training runs).

A full disk is a real limit here: ``RLIMIT_FSIZE`` stops this process's files from growing past a few
kilobytes, and a write past it fails (``EFBIG``) as a full disk's does (``ENOSPC``).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import tiny
from stable_cascade.cli import output
from stable_cascade.cli.main import main
from stable_cascade.convert import Kind, to_original_state_dict
from stable_cascade.engine import ImageRecord, Job, ModelSources, read_png, save_png
from stable_cascade.nn.unet import StableCascadeUNet

resource = pytest.importorskip("resource")  # POSIX
ROOT = Path(__file__).resolve().parents[1]
DEMO = ["--model", "demo", "--device", "cpu", "--prior-steps", "2", "--decoder-steps", "2", "--seed", "3"]


@contextlib.contextmanager
def full_disk(limit: int) -> Iterator[None]:
    """No file of this process grows past ``limit`` bytes while the block runs (SIGXFSZ, which would
    kill the process, ignored: the write fails instead)."""
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def noise(side: int, seed: int = 0) -> PIL.Image.Image:
    """An image that does not compress: ``side``² · 3 bytes as a PNG."""
    pixels = np.random.default_rng(seed).integers(0, 255, (side, side, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


def record() -> ImageRecord:
    job = Job.create(prompt="x", seed=0, models=ModelSources(model="demo"))
    return ImageRecord(job=job, width=8, height=8)


def run(argv: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The command line in this process: its exit code and its stderr lines (progress bars left out)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    lines = []
    for line in capsys.readouterr().err.splitlines():
        if "error: " in line:  # after an unfinished progress bar on the same line
            lines.append(line[line.index("error: ") :])
        elif line.strip() and "it/s" not in line and "s/it" not in line:  # tqdm: fast or slow steps
            lines.append(line)
    return code, "\n".join(lines)


# -- atomic writes ----------------------------------------------------------------------------------


def test_a_full_disk_keeps_the_old_file_and_leaves_no_part(tmp_path: Path) -> None:
    from stable_cascade.checkpoint import atomic

    path = tmp_path / "notes.txt"
    path.write_text("the old text")
    with full_disk(4096), pytest.raises(OSError) as caught:
        atomic.write_bytes(path, b"x" * 10_000)
    assert caught.value.errno == errno.EFBIG and caught.value.filename == str(path)
    assert path.read_text() == "the old text" and os.listdir(tmp_path) == ["notes.txt"]
    with full_disk(4096), pytest.raises(OSError), atomic.atomic_folder(tmp_path / "new" / "model") as folder:
        (folder / "config.json").write_text("{}")
        (folder / "weights").write_bytes(b"x" * 10_000)
    assert os.listdir(tmp_path) == ["notes.txt"]  # neither the folder, its temporary nor its parent


def test_save_png_on_a_full_disk_keeps_the_old_image(tmp_path: Path) -> None:
    path = tmp_path / "image.png"
    save_png(noise(16), path, record())
    before = path.read_bytes()
    with full_disk(8192), pytest.raises(OSError, match="File too large"):
        save_png(noise(128), path, record())  # 48 kB of noise
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["image.png"]
    assert read_png(path).width == 8


def test_overwrite_on_a_full_disk_fails_in_one_line_and_keeps_the_old_image(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cat.png"
    noise(16).save(path)
    before = path.read_bytes()
    with full_disk(12_000):  # the demo's 128² image takes about 23 kB
        code, err = run(["generate", "a red circle", *DEMO, "-o", path, "--overwrite"], capsys)
    assert code == 2 and err == f"error: {path}: File too large", err
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["cat.png"]


def unet_file(folder: Path) -> Path:
    """A tiny Stage C as an original single file (about 600 kB)."""
    torch.manual_seed(0)
    state = to_original_state_dict(StableCascadeUNet(tiny.TINY_PRIOR).state_dict(), Kind.STAGE_C)
    path = folder / "stage_c.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    return path


def test_convert_on_a_full_disk_fails_in_one_line_and_leaves_no_partial_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = unet_file(tmp_path)
    with full_disk(16_384):
        code, err = run(["convert", source, tmp_path / "out" / "prior"], capsys)
    assert code == 2 and err.count("\n") == 0 and err.startswith("error: ") and "File too large" in err, err
    assert sorted(os.listdir(tmp_path)) == ["stage_c.safetensors"]  # no out/, no temporary
    assert run(["convert", source, tmp_path / "prior"], capsys)[0] == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "prior").iterdir()}
    with full_disk(16_384):
        code, err = run(["convert", source, tmp_path / "prior", "--force", "--dtype", "fp16"], capsys)
    assert code == 2 and "File too large" in err and err.count("\n") == 0, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "prior").iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["prior", "stage_c.safetensors"]


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    for index in range(2):
        noise(32, index).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"image {index}")
    return folder


def train_argv(data: Path, out: Path, steps: int, *extra: str) -> list[object]:
    options = ["--init-config", "tiny_vqgan", "--resolution", "32", "--batch-size", "2", "--ema-decay", "0"]
    return ["train", "stage-a", "--data", data, "-o", out, *options, "--steps", steps, *extra]


def test_training_on_a_full_disk_fails_in_one_line_and_keeps_the_last_checkpoint(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    with full_disk(20_000):  # the random states fit, the weights do not
        code, err = run(train_argv(images, out, 1, "--checkpoint-every", "1"), capsys)
    assert code == 2 and err.startswith("error: ") and "File too large" in err and "\n" not in err, err
    assert sorted(os.listdir(out)) == []  # no checkpoint-1.partial, no final
    assert run(train_argv(images, out, 1, "--checkpoint-every", "1"), capsys)[0] == 0
    kept = {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()}
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    with full_disk(20_000):
        code, err = run(train_argv(images, out, 2, "--checkpoint-every", "1", "--resume", "latest"), capsys)
    assert code == 2 and "File too large" in err and "\n" not in err, err
    assert sorted(os.listdir(out)) == ["checkpoint-1", "final"]
    assert {p.name: p.read_bytes() for p in (out / "checkpoint-1").iterdir()} == kept
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == final


# -- names: reserved, never shared ------------------------------------------------------------------


def test_two_runs_racing_into_one_folder_never_take_one_name(tmp_path: Path) -> None:
    """Both choose their names at the same moment (the barrier), then both write (same seed)."""
    chosen: list[Path] = []
    start, written = threading.Barrier(2), threading.Barrier(2)

    def one_run(seed: int) -> None:
        start.wait()
        (path,) = output.output_paths(str(tmp_path / "conc"), [1], "x")
        chosen.append(path)
        written.wait()
        save_png(noise(8, seed), path, record())

    for _ in range(5):
        threads = [threading.Thread(target=one_run, args=(seed,)) for seed in (1, 2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(set(chosen)) == 10 and sorted(p.name for p in (tmp_path / "conc").iterdir()) == sorted(
        f"{n:05d}-1.png" for n in range(10)
    )
    assert all(p.stat().st_size > 0 for p in chosen)


RACER = """
import sys
from stable_cascade.cli.output import output_paths, release, save_image
import PIL.Image
for index in range(20):
    (path,) = output_paths(sys.argv[1], [7], "x", previews=True)
    save_image(PIL.Image.new("RGB", (8, 8), (index, 0, 0)), path)
release()
"""


@pytest.mark.slow
def test_two_processes_writing_into_one_folder_never_take_one_name(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    racers = [
        subprocess.Popen([sys.executable, "-c", RACER, str(tmp_path)], env=env, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    for racer in racers:
        assert racer.wait(timeout=120) == 0, racer.stderr.read() if racer.stderr else ""
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(f"{n:05d}-7.png" for n in range(40))  # every reserved preview was released


def test_a_failed_run_leaves_no_reserved_name_behind(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from stable_cascade.engine import Engine

    def fail(*args: object, **kwargs: object) -> Iterator[object]:
        raise OSError("the device fell off the bus")
        yield

    monkeypatch.setattr(Engine, "run", fail)
    code, err = run(["generate", "x", *DEMO, "--count", "3", "--preview", "-o", tmp_path / "a" / "b"], capsys)
    assert code == 2 and "fell off the bus" in err
    assert os.listdir(tmp_path) == []  # neither the empty reservations nor the folders made for them


def test_output_patterns_take_only_their_placeholders(tmp_path: Path) -> None:
    assert output.output_paths(str(tmp_path / "{index:03d}-{seed}"), [5, 6], "x")[1].name == "001-6.png"
    for pattern in ("{seed.real}", "{0}", "{}", "{seed!r}", "{seed[0]}", "{width}"):
        with pytest.raises(ValueError, match=r"its placeholders are \{seed\}, \{index\}, \{prompt\}"):
            output.output_paths(str(tmp_path / pattern), [5], "x")
    with pytest.raises(ValueError, match=r"bad output pattern .*placeholders are"):
        output.output_paths(str(tmp_path / "{index:q}"), [5], "x")


# -- nothing replaced without --overwrite ------------------------------------------------------------


def test_an_existing_preview_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "cat.preview.png").write_bytes(b"the user's own file")
    code, err = run(["generate", "x", *DEMO, "--preview", "-o", tmp_path / "cat.png"], capsys)
    assert code == 2 and err == (
        f"error: {tmp_path / 'cat.preview.png'} already exists; pass --overwrite to replace it, or choose "
        "another -o"
    )
    assert os.listdir(tmp_path) == ["cat.preview.png"]
    assert (tmp_path / "cat.preview.png").read_bytes() == b"the user's own file"
    assert (
        run(["generate", "x", *DEMO, "--preview", "-o", tmp_path / "cat.png", "--overwrite"], capsys)[0] == 0
    )
    assert PIL.Image.open(tmp_path / "cat.preview.png").size[0] > 0


def test_training_onto_an_earlier_run_needs_resume(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert run(train_argv(images, out, 1), capsys)[0] == 0
    final = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    code, err = run(train_argv(images, out, 1), capsys)
    assert code == 2 and err.startswith(f"error: {out} already holds a training run (checkpoint-1, final)")
    assert "--resume latest" in err and "\n" not in err
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == final
    assert run(train_argv(images, out, 2, "--resume", "latest"), capsys)[0] == 0
    assert (out / "checkpoint-2").is_dir()


def test_training_checks_its_output_folder_before_any_work(
    images: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("models were loaded")

    monkeypatch.setattr("stable_cascade.training.trainer.load_components", refuse)
    (tmp_path / "a_file").write_text("")
    code, err = run(train_argv(images, tmp_path / "a_file" / "run", 1), capsys)
    assert code == 2 and err.startswith(f"error: cannot write into the output folder {tmp_path}/a_file/run")
    assert "\n" not in err
