"""Every mistake on the command line: exit code 2, one ``error:`` line, nothing written — and
``--from-png`` reproducing img2img, variation, reconstruction and LoRA images; a fast start-up."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from PIL.PngImagePlugin import PngInfo

import tiny
from stable_cascade.cli import choices
from stable_cascade.cli.main import main
from stable_cascade.cli.output import output_paths
from stable_cascade.loading.bundles import BUNDLES

ROOT = Path(__file__).resolve().parents[1]
DEMO_B = ["--model", "demo", "--device", "cpu", "--decoder-steps", "2", "--seed", "3"]  # Stage B only
DEMO = [*DEMO_B, "--prior-steps", "2"]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exit_info:  # the parser's errors
        code = int(exit_info.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def messages(stderr: str) -> list[str]:
    """stderr without progress bars and transformers' notices."""
    return [
        line
        for line in stderr.splitlines()
        if line.strip() and "it/s]" not in line and not line.startswith("[transformers]")
    ]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("errors")
    rng = np.random.default_rng(0)
    for name in ("input", "other"):
        PIL.Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(folder / f"{name}.png")
    PIL.Image.new("1", (9000, 8000)).save(folder / "bomb.png")  # 72 M pixels in a few kB
    (folder / "a_file").write_text("not a folder")
    for name, record in {"bad_record": '{"schema": 2, "job": {"width": 0}}', "deep": "[" * 100_000}.items():
        info = PngInfo()
        info.add_text("stable_cascade", record)
        PIL.Image.new("RGB", (8, 8)).save(folder / f"{name}.png", pnginfo=info)
    return folder


MISTAKES = {
    "width 0": (["--width", "0"], "width must be between 1 and 8192"),
    "height 0": (["--height", "0"], "height must be between 1 and 8192"),
    "huge width": (["--width", "16384", "--height", "128"], "at most 8192 pixels per side"),
    "too many pixels": (["--width", "8192", "--height", "4096"], "more than the limit of 16,777,216"),
    "no steps": (["--prior-steps", "0"], "Stage C steps must be between 1 and 1000"),
    "too many steps": (["--decoder-steps", "1001"], "Stage B steps must be between 1 and 1000"),
    "batch size": (["--batch-size", "65"], "batch size must be between 1 and 64"),
    "count": (["--count", "0"], "count must be between 1 and"),
    "guidance inf": (["--prior-guidance", "inf"], "Stage C guidance must be a finite number"),
    "shift nan": (["--shift", "nan"], "Stage C shift must be a finite number"),
    "surrogates": (["--negative-prompt", "bad \udcff bytes"], "negative prompt is not valid UTF-8 text"),
    "meta device": (["--device", "meta"], "device 'meta' holds no data"),
    "unknown device": (["--device", "toaster"], "unknown device 'toaster'"),
    "output in a file": (["-o", "{r}/a_file/x.png"], "is a file, not a folder"),
    "existing output": (["-o", "{r}/input.png"], "already exists; pass --overwrite"),
    "from-png onto itself": (["--from-png", "{r}/bad_record.png", "-o", "{r}/bad_record.png"], "width"),
    "bad record": (["--from-png", "{r}/bad_record.png"], "width must be between 1 and 8192"),
    "deep record": (["--from-png", "{r}/deep.png"], "is not a valid stable_cascade record"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_generate_mistakes_stop_before_any_work(
    mistake: str, root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    extra, expected = MISTAKES[mistake]
    argv = ["generate", "a cat", *DEMO, "-o", tmp_path / "out", *[a.replace("{r}", str(root)) for a in extra]]
    code, out, err = run(argv, capsys)
    assert code == 2 and len(messages(err)) == 1 and messages(err)[0].startswith("error: "), err
    assert expected in err and "Traceback" not in err and "seed" not in out
    assert not (tmp_path / "out").exists()


def test_image_mistakes(root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["-o", tmp_path / "x.png"]
    for argv, expected in (
        (
            ["img2img", root / "bomb.png", "x", *DEMO, *out],
            "the limit is 67,108,864 pixels",
        ),
        (["img2img", root / "input.png", "x", "--strength", "nan", *DEMO, *out], "strength must be a finite"),
        (["img2img", root / "input.png", "x", *DEMO, "-o", root / "input.png", "--overwrite"], "is an input"),
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and len(messages(err)) == 1 and expected in err, err
    assert list(tmp_path.iterdir()) == []


def test_variation_on_a_model_without_an_image_encoder(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shipped models all have one; a model without one (as the demo was before its image steps)."""
    monkeypatch.setitem(BUNDLES, "demo", dataclasses.replace(BUNDLES["demo"], image_encoder=False))
    code, _, err = run(["variation", root / "input.png", *DEMO, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and len(messages(err)) == 1 and "the demo model has no CLIP image encoder" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (FloatingPointError("Stage B produced NaN at step 2 of 10"), "Stage B produced NaN"),
        (MemoryError(), "out of memory; try a smaller size or --batch-size"),
        (
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            "out of",
        ),
    ],
)
def test_failures_while_running_are_one_line(
    error: BaseException,
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stable_cascade.engine import Engine

    def fail(*args: object, **kwargs: object) -> typing.Iterator[object]:
        raise error
        yield

    monkeypatch.setattr(Engine, "run", fail)
    code, _, err = run(["generate", "x", *DEMO, "-o", tmp_path / "x.png"], capsys)
    assert code == 2 and messages(err) == [messages(err)[0]] and expected in err, err


def test_folders_number_past_99999(tmp_path: Path) -> None:
    for name in ("99999-1.png", "100000-5.png", "notes.txt"):
        (tmp_path / name).write_text("")
    assert [p.name for p in output_paths(str(tmp_path), [7, 8], "x")] == ["100001-7.png", "100002-8.png"]
    assert output_paths(str(tmp_path / "100000-5.png"), [1], "x", overwrite=True)


# -- reproduction ----------------------------------------------------------------------------------


def test_from_png_reproduces_img2img_and_reconstruct(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image, other = root / "input.png", root / "other.png"
    for task, argv in (("img2img", [image, "a red circle", "--strength", "0.6"]), ("reconstruct", [image])):
        first, again = tmp_path / f"{task}.png", tmp_path / f"{task}-again.png"
        settings = DEMO if task == "img2img" else DEMO_B
        code, _, err = run([task, *argv, *settings, "-o", first], capsys)
        assert code == 0, err
        code, _, err = run([task, image, "--from-png", first, "-o", again, "--device", "cpu"], capsys)
        assert code == 0 and not any(line.startswith("warning") for line in messages(err)), err
        assert np.array_equal(pixels(again), pixels(first))
        code, _, err = run(["generate", "--from-png", first, "-o", tmp_path / "x.png"], capsys)
        assert code == 2 and f"give the input image: stable-cascade {task} IMAGE --from-png" in err
        code, _, err = run([task, other, "--from-png", first, "-o", tmp_path / f"{task}-other.png"], capsys)
        assert code == 0 and "differs from the input image recorded" in err


def test_from_png_reproduces_variation_and_loras_and_names_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    prior, decoder = tiny.save_pipelines(tmp_path)
    lora = Path(tiny.lora_file(tmp_path / "style.safetensors", 1))
    PIL.Image.new("RGB", (64, 64), "red").save(tmp_path / "red.png")
    models = ["--prior", prior, "--decoder", decoder, "--device", "cpu", "--width", "128", "--height", "128"]
    models += ["--prior-steps", "2", "--decoder-steps", "2", "--seed", "4"]
    for name, argv in {
        "variation": ["variation", tmp_path / "red.png"],
        "lora": ["generate", "a cat", "--lora", f"{lora}:0.7"],
    }.items():
        first = tmp_path / f"{name}.png"
        assert run([*argv, *models, "-o", first], capsys)[0] == 0
        again = [argv[0], *argv[1 : 2 if name == "variation" else 1], "--from-png", first, "--device", "cpu"]
        code, out, err = run([*again, "-o", tmp_path / f"{name}-again.png"], capsys)
        assert code == 0, err
        assert f"models recorded in {first}: model=full, prior={prior}, decoder={decoder}" in out
        assert np.array_equal(pixels(tmp_path / f"{name}-again.png"), pixels(first))
    assert f"lora={lora}:0.7" in out
    tiny.lora_file(lora, 2)  # another LoRA under the recorded name: a warning
    code, _, err = run(
        ["generate", "--from-png", tmp_path / "lora.png", "-o", tmp_path / "changed.png"], capsys
    )
    assert code == 0 and "differs from the one recorded" in err + caplog.text  # logged: a warning line
    lora.unlink()
    code, _, err = run(["generate", "--from-png", tmp_path / "lora.png", "-o", tmp_path / "gone.png"], capsys)
    assert code == 2 and len(messages(err)) == 1 and "recorded in" in err and "does not exist" in err


# -- start-up --------------------------------------------------------------------------------------


def test_the_parser_imports_no_model_library_and_version_works() -> None:
    code = (
        "import sys\nfrom stable_cascade.cli.main import build_parser\nbuild_parser()\n"
        "heavy = {'torch', 'transformers', 'numpy', 'PIL', 'safetensors'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)
    version = subprocess.run(
        [sys.executable, "-m", "stable_cascade", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and version.stdout.startswith("stable-cascade ")


def test_the_command_line_choices_are_the_librarys() -> None:
    from stable_cascade.diffusion.presets import COMBINED_PRESETS
    from stable_cascade.diffusion.samplers import SAMPLERS
    from stable_cascade.engine import BUNDLES, DEFAULT_BUNDLE
    from stable_cascade.engine.models import Offload
    from stable_cascade.fields import BY_NAME
    from stable_cascade.training import config

    assert BY_NAME["prior_sampler"].choices == tuple(sorted(SAMPLERS)) == BY_NAME["decoder_sampler"].choices
    assert BY_NAME["preset"].choices == tuple(COMBINED_PRESETS)
    assert BY_NAME["model"].choices == tuple(BUNDLES) and BY_NAME["model"].default == DEFAULT_BUNDLE
    assert typing.get_args(Offload) == choices.OFFLOADS
    assert typing.get_args(config.Task) == choices.TRAIN_TASKS
    assert typing.get_args(config.ControlNetKind) == choices.CONTROLNET_KINDS
    assert typing.get_args(config.LossWeighting) == choices.LOSS_WEIGHTINGS
    assert typing.get_args(config.MixedPrecision) == choices.MIXED_PRECISIONS
    assert typing.get_args(config.ReconstructionLoss) == choices.RECONSTRUCTION_LOSSES
    assert typing.get_args(config.LCMStage) == choices.LCM_STAGES
    assert typing.get_args(config.LCMLoss) == choices.LCM_LOSSES
    assert choices.DEFAULT_BUCKET_RATIOS == config.DEFAULT_BUCKET_RATIOS


def test_cpu_threads_default(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    from stable_cascade.engine.threads import default_threads

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert main(["shapes", "prompts"]) == 0
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"  # set before the command imports torch
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert main(["shapes", "prompts"]) == 0 and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert 1 <= default_threads() <= len(os.sched_getaffinity(0))
