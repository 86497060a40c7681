"""The ``stable-cascade`` command line, run as real subprocesses on tiny local models.

Start-up (importing torch and transformers) costs seconds per process, so the commands that do not
depend on each other start together in one wave, and those that read the first wave's files in a
second; the tests then check what each command printed and wrote. Every ``--help`` and the mistakes
caught before any model loads are checked in-process through ``main``, which the console script calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from stable_cascade.cli.main import main
from stable_cascade.convert import Kind, to_original_state_dict
from stable_cascade.engine import image_sha256, read_png, sha256_file
from stable_cascade.engine.legacy import parse_infotext
from stable_cascade.engine.record import JSON_KEY
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.specs import EffNetConfig

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--width", "128", "--height", "128", "--prior-steps", "2", "--decoder-steps", "2"]
CPU = ["--device", "cpu", "--dtype", "fp32"]
PROMPT = ["a red cat", "--negative-prompt", "blurry, dark"]


@dataclasses.dataclass(frozen=True)
class Finished:
    returncode: int
    stdout: str
    stderr: str

    @property
    def messages(self) -> list[str]:
        """stderr without progress bars and transformers' import-time notices."""
        return [
            line
            for line in self.stderr.splitlines()
            if line.strip() and not line.startswith("[transformers]") and "it/s]" not in line
        ]


def one_error_line(stderr: str) -> str:
    lines = Finished(0, "", stderr).messages
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny prior and decoder pipeline folders, single files (Stage C, EfficientNet, previewer, a
    ComfyUI bundle), an input image and files that are not what they claim."""
    root = tmp_path_factory.mktemp("cli")
    tokenizer = tiny.tokenizer(root / "tokenizer")
    prior = tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), 0, scale=0.1)
    StableCascadePriorPipeline(
        tokenizer=tokenizer,
        text_encoder=tiny.text_encoder(),
        prior=prior,
        scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=tiny.feature_extractor(),
        image_encoder=tiny.image_encoder(),
    ).save_pretrained(root / "prior")
    StableCascadeDecoderPipeline(
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 1, scale=0.1),
        tokenizer=tokenizer,
        text_encoder=tiny.text_encoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), 2, scale=0.1),
    ).save_pretrained(root / "decoder")
    torch.manual_seed(0)
    effnet_config = EffNetConfig(
        stage_channels=(8, 8, 16, 16, 16, 16), stage_depths=(1,) * 6, head_channels=32
    )
    effnet = EfficientNetEncoder(effnet_config).eval()
    previewer = tiny.randomize_(Previewer(c_hidden=8), 3, scale=0.2)
    stage_c = to_original_state_dict(prior.state_dict(), Kind.STAGE_C)
    parts = {"model.diffusion_model.": stage_c, "vae.encoder.": effnet.state_dict()}
    parts["vae.previewer."] = previewer.state_dict()
    for name, tensors in {
        "stage_c": stage_c,
        "effnet": effnet.state_dict(),
        "previewer": previewer.state_dict(),
        "bundle": {prefix + k: v for prefix, part in parts.items() for k, v in part.items()},
    }.items():
        save_file({k: v.contiguous() for k, v in tensors.items()}, root / f"{name}.safetensors")
    pixels = np.random.default_rng(0).integers(0, 255, (96, 128, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(root / "input.png")
    (root / "model.ckpt").write_bytes(b"not read")
    (root / "not_an_image.png").write_text("not an image")
    return root


def start(root: Path, *args: str | Path, program: str | None = None) -> subprocess.Popen[str]:
    """The CLI in a subprocess, offline, in ``root``; ``program``: the console script instead of -m."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(root / "hf"), "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [program] if program else [sys.executable, "-m", "stable_cascade"]
    return subprocess.Popen(
        [*command, *map(str, args)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(processes: dict[str, subprocess.Popen[str]]) -> dict[str, Finished]:
    done = {}
    for name, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        done[name] = Finished(process.returncode, stdout, stderr)
    return done


@pytest.fixture(scope="module")
def runs(files: Path) -> Iterator[dict[str, Finished]]:
    r = files
    models = ["--prior", r / "prior", "--decoder", r / "decoder"]
    image, effnet, previewer = r / "input.png", r / "effnet.safetensors", r / "previewer.safetensors"
    singles = [*PROMPT, *models, *FAST, *CPU, "--seed", "5", "--count", "2", "-o", r / "singles"]
    batch = [
        *PROMPT,
        *models,
        *FAST,
        *CPU,
        "--seed",
        "5",
        "--batch-size",
        "2",
        "-o",
        r / "batch/{index}-{seed}.png",
    ]
    img2img = [image, "a dog", *models, "--effnet", effnet, *FAST, *CPU, "--strength", "0.5", "--seed", "3"]
    reconstruct = [image, "--decoder", r / "decoder", "--effnet", effnet, "--decoder-steps", "2", *CPU]
    console = shutil.which("stable-cascade")  # the installed entry point, else python -m stable_cascade
    wave = {
        "help": start(r, "--help", program=console),
        "singles": start(r, "generate", *singles, "--preview", "--previewer", previewer),
        "batch": start(r, "generate", *batch),
        "img2img": start(r, "img2img", *img2img, "-o", r / "img2img.png"),
        "variation": start(r, "variation", image, *models, *FAST, *CPU, "-o", r / "variation.png"),
        "reconstruct": start(r, "reconstruct", *reconstruct, "-o", r / "reconstruct.png"),
        "convert": start(r, "convert", r / "stage_c.safetensors", r / "converted"),
        "inspect": start(r, "inspect", r / "stage_c.safetensors", r / "prior", r / "bundle.safetensors"),
        "offline": start(r, "generate", "x", *CPU),
    }
    done = finish(wave)
    second = {
        "repro": start(
            r,
            "generate",
            "--from-png",
            r / "singles" / "00001-6.png",
            "--device",
            "cpu",
            "-o",
            r / "repro.png",
        ),
        "convert_back": start(r, "convert", r / "converted", r / "back.safetensors"),
    }
    done.update(finish(second))
    yield done


def succeeded(runs: dict[str, Finished], name: str) -> Finished:
    run = runs[name]
    assert run.returncode == 0, f"{name} failed:\n{run.stdout}\n{run.stderr}"
    return run


def pixels(path: Path) -> np.ndarray:
    return np.asarray(PIL.Image.open(path).convert("RGB")).astype(np.int16)


def chunks(path: Path) -> tuple[str, dict[str, object]]:
    with PIL.Image.open(path) as image:
        return image.info["parameters"], json.loads(image.info[JSON_KEY])


@pytest.mark.slow
def test_help_through_the_console_script(runs: dict[str, Finished]) -> None:
    out = succeeded(runs, "help").stdout
    assert "usage: stable-cascade" in out
    for command in ("generate", "img2img", "variation", "reconstruct", "convert", "inspect"):
        assert command in out
    if shutil.which("stable-cascade") is None:
        pytest.skip("the stable-cascade entry point is not installed (pip install -e .); ran python -m")


def test_inspect_released_lists_the_released_models(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", "--released"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("prior_lite", "decoder_lite", "vqgan", "3,589,103,632"))


@pytest.mark.parametrize("command", ["generate", "img2img", "variation", "reconstruct", "convert", "inspect"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: stable-cascade {command}" in capsys.readouterr().out


@pytest.mark.slow
def test_generate_writes_images_with_parameters_and_previews(runs: dict[str, Finished], files: Path) -> None:
    run = succeeded(runs, "singles")
    assert "seed 5" in run.stdout and "Stage C" in run.stdout and "Stage B+A" in run.stdout
    assert "Stage C:" in run.stderr and "Stage B:" in run.stderr  # the progress bars' labels
    assert sorted(p.name for p in (files / "singles").iterdir()) == [
        "00000-5.png",
        "00000-5.preview.png",
        "00001-6.png",
        "00001-6.preview.png",
    ]
    text, record = chunks(files / "singles" / "00001-6.png")
    assert text.startswith(
        "a red cat\nNegative prompt: blurry, dark\nSteps: 2, Sampler: DDPM, CFG scale: 4.0"
    )
    # a folder's prior and decoder pipelines: the folder's name
    assert f"Seed: 6, Size: 128x128, Model: {files.name}, Preset: reference, Shift: 2.0" in text
    assert "Stage B steps: 2, Stage B CFG scale: 1.1, Stage B sampler: DDPM, Stage B shift: 1.0" in text
    job = record["job"]
    assert record["seed"] == 6 and record["index"] == 1 and record["width"] == record["height"] == 128
    assert job["seed"] == 5 and job["count"] == 2 and job["width"] == job["height"] == 128
    stage = {name: {k: job[f"{name}_{k}"] for k in ("steps", "guidance", "sampler", "shift", "rescale")}
             for name in ("prior", "decoder")}  # fmt: skip
    assert stage["prior"] == {"steps": 2, "guidance": 4.0, "sampler": "ddpm", "shift": 2.0, "rescale": 0.7}
    assert stage["decoder"] == {"steps": 2, "guidance": 1.1, "sampler": "ddpm", "shift": 1.0, "rescale": 0.0}
    assert job["prior"] == str(files / "prior")
    hashes = record["model_sha256"]
    assert set(hashes) == {"prior", "decoder", "previewer"}  # type: ignore[arg-type]
    assert hashes["previewer"] == sha256_file(files / "previewer.safetensors")  # type: ignore[index]
    assert record["version"] and job["dtype"] == "fp32"
    parsed = parse_infotext(text)["job"]  # the infotext alone gives the settings back, too
    stored = read_png(files / "singles" / "00001-6.png")
    assert (parsed.prompt, parsed.negative_prompt, parsed.seed, parsed.prior_settings) == (
        stored.job.prompt,
        stored.job.negative_prompt,
        stored.seed,
        stored.job.prior_settings,
    )


@pytest.mark.slow
def test_from_png_reproduces_the_image_bit_for_bit(runs: dict[str, Finished], files: Path) -> None:
    assert "seed 6" in succeeded(runs, "repro").stdout
    original = files / "singles" / "00001-6.png"
    assert np.array_equal(pixels(files / "repro.png"), pixels(original))
    (text, record), (original_text, original_record) = chunks(files / "repro.png"), chunks(original)
    assert text == original_text
    assert record["job"] == {**original_record["job"], "seed": 6, "count": 1}  # type: ignore[dict-item]
    assert (record["index"], record["seed"]) == (0, 6)


@pytest.mark.slow
def test_image_i_of_a_batch_is_the_single_run_with_seed_plus_i(
    runs: dict[str, Finished], files: Path
) -> None:
    succeeded(runs, "batch")
    assert sorted(p.name for p in (files / "batch").iterdir()) == ["0-5.png", "1-6.png"]
    # Same noise; a batched convolution may round differently, so allow one level of 255.
    difference = np.abs(pixels(files / "batch" / "1-6.png") - pixels(files / "singles" / "00001-6.png"))
    assert difference.max() <= 1
    assert chunks(files / "batch" / "1-6.png")[1]["index"] == 1


@pytest.mark.slow
def test_img2img_variation_and_reconstruct(runs: dict[str, Finished], files: Path) -> None:
    for name in ("img2img", "variation", "reconstruct"):
        succeeded(runs, name)
    text, record = chunks(files / "img2img.png")
    job = record["job"]
    assert "Denoising strength: 0.5" in text and job["strength"] == 0.5 and job["task"] == "img2img"
    with PIL.Image.open(files / "input.png") as image:
        assert job["input_image_sha256"] == image_sha256(image)
    assert chunks(files / "variation.png")[1]["job"]["task"] == "variation"
    _, record = chunks(files / "reconstruct.png")
    assert record["job"]["prior"] is None and (record["width"], record["height"]) == (
        128,
        96,
    )  # the input's size
    assert PIL.Image.open(files / "reconstruct.png").size == (128, 96)


@pytest.mark.slow
def test_convert_round_trip_keeps_every_tensor(runs: dict[str, Finished], files: Path) -> None:
    assert "Stage C (prior)" in succeeded(runs, "convert").stdout
    succeeded(runs, "convert_back")
    assert (files / "converted" / "config.json").is_file()
    original, back = load_file(files / "stage_c.safetensors"), load_file(files / "back.safetensors")
    assert original.keys() == back.keys()
    assert all(torch.equal(original[k], back[k]) for k in original)


@pytest.mark.slow
def test_inspect_files_folders_and_bundles(runs: dict[str, Finished]) -> None:
    out = succeeded(runs, "inspect").stdout
    for expected in (
        "stage_c.safetensors: Stage C (prior)",
        "variant: custom",
        "layout: original single file",
        "parameters: ",
        "StableCascadePriorPipeline",
        "layout: diffusers pipeline folder",
        "image_encoder: transformers.CLIPVisionModelWithProjection",
        "bundle.safetensors: ComfyUI bundle",
        "effnet: EfficientNet encoder",
        "previewer: previewer",
    ):
        assert expected in out


@pytest.mark.slow
def test_a_mistake_in_a_real_process_ends_with_one_line_and_exit_code_2(runs: dict[str, Finished]) -> None:
    # No model given, none cached, no network: the default model cannot load.
    assert runs["offline"].returncode == 2, runs["offline"].stderr
    offline = one_error_line(runs["offline"].stderr)
    assert (
        "could not be downloaded" in offline and "--prior/--decoder" in offline and "--model demo" in offline
    )


MISTAKES = {
    "bad size": (["generate", "x", "--width", "100"], "width must be a multiple of 8"),
    "missing file": (
        ["generate", "x", "--prior", "{r}/missing", "--decoder", "{r}/decoder"],
        "does not exist",
    ),
    "unknown model": (["generate", "x", "--model", "nope"], "unknown model 'nope'"),
    "pickle file": (["generate", "x", "--prior", "{r}/model.ckpt"], "pickle"),
    "strength without img2img": (
        ["generate", "x", "--strength", "0.5"],
        "unrecognized arguments: --strength",
    ),
    "strength out of range": (
        ["img2img", "{r}/input.png", "x", "--strength", "2"],
        "strength must be in [0, 1]",
    ),
    "unreadable image": (["img2img", "{r}/not_an_image.png", "x"], "is not an image file that PIL can read"),
    "missing image": (["variation", "{r}/nothing.png"], "does not exist"),
    "no prompt": (["generate"], "needs a PROMPT"),
    "one file, two images": (["generate", "x", "--batch-size", "2", "-o", "one.png"], "names one file"),
    "unknown sampler": (["generate", "x", "--sampler", "heun"], "unknown Stage C sampler 'heun'"),
    "no parameters in the PNG": (["generate", "--from-png", "{r}/input.png"], "no generation parameters"),
    "overwrite": (["convert", "{r}/stage_c.safetensors", "{r}/prior"], "already exists"),
    "inspect a pickle": (["inspect", "{r}/model.ckpt"], "pickle file"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_user_mistakes_end_with_one_error_line(
    mistake: str, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv, expected = MISTAKES[mistake]
    argv = [a.replace("{r}", str(files)) for a in argv]
    if argv[0] not in ("convert", "inspect"):
        argv += ["--device", "cpu"]
    try:
        code = main(argv)
    except SystemExit as exit_info:  # the parser's errors
        code = int(exit_info.code or 0)
    assert code == 2
    assert expected in one_error_line(capsys.readouterr().err)


def test_debug_shows_the_traceback(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "x", "--prior", str(files / "missing"), "--device", "cpu", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: --prior" in err
