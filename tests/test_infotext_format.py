"""The infotext in AUTOMATIC1111's format: Stage C under its keys (``Steps``, ``Sampler`` by its names,
``CFG scale``), Stage B under keys of its own, LoRAs as ``<lora:…>`` in the prompt; read back by
``--from-png`` from AUTOMATIC1111's own texts and from this package's earlier ``Steps: 20+10`` texts."""

from __future__ import annotations

import logging
from pathlib import Path

import PIL.Image
import pytest
from PIL.PngImagePlugin import PngInfo

from stable_cascade.cli.generate import job_of
from stable_cascade.cli.main import build_parser
from stable_cascade.engine import ImageRecord, Job, LoraRef
from stable_cascade.fields import infotext


def _rerun(tmp_path: Path, text: str, *argv: str) -> Job:
    """The job of ``generate --from-png`` on a PNG carrying ``text`` alone."""
    info = PngInfo()
    info.add_text("parameters", text)
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "other.png", pnginfo=info)
    args = build_parser().parse_args(["generate", *argv, "--from-png", str(tmp_path / "other.png")])
    return job_of(args)[0]


def test_our_text_is_automatic1111s_and_reads_back(tmp_path: Path) -> None:
    lora = tmp_path / "ink.safetensors"
    lora.write_bytes(b"a LoRA (hashed, never loaded)")
    job = Job.create(prompt="a cat", negative_prompt="dog", model="demo", seed=7, prior_steps=12,
                     prior_sampler="euler_ancestral", prior_guidance=5.0, prior_shift=1.5,
                     decoder_steps=6, decoder_sampler="ddim", decoder_guidance=1.3, decoder_shift=1.25,
                     emphasis="no_norm", loras=[LoraRef(str(lora), 0.8)])  # fmt: skip
    text = ImageRecord(job, seed=7).infotext()
    assert text.startswith("a cat <lora:ink:0.8>\nNegative prompt: dog\n")
    settings = text.splitlines()[-1]
    assert settings.startswith(
        "Steps: 12, Sampler: Euler a, CFG scale: 5.0, Seed: 7, Size: 128x128, Model: demo"
    )
    for part in ("Emphasis: No norm", "Shift: 1.5", "Stage B steps: 6", "Stage B sampler: DDIM",
                 "Stage B CFG scale: 1.3", "Stage B shift: 1.25"):  # fmt: skip
        assert part in settings, settings
    read = infotext.parse(text)
    stages = [f"{stage}_{key}" for stage in ("prior", "decoder") for key in ("steps", "sampler", "guidance")]
    for name in (*stages, "prior_shift", "decoder_shift", "emphasis", "negative_prompt"):
        assert read[name] == getattr(job, name), name
    assert read["prompt"] == "a cat <lora:ink:0.8>"  # as AUTOMATIC1111 shows it: the server takes the tag
    shown = infotext.parameters(text)  # PNG Info
    assert (shown["Prompt"], shown["Steps"], shown["Sampler"], shown["Size-1"]) == (
        "a cat <lora:ink:0.8>", "12", "Euler a", "128")  # fmt: skip
    plain = ImageRecord(Job.create(prompt="x", model="demo", seed=1), seed=1).infotext()
    assert "Emphasis" not in plain and "Task" not in plain  # AUTOMATIC1111 leaves out the defaults too


def test_from_png_reads_automatic1111s_text(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = (
        "a red circle <lora:ink:0.7>\nNegative prompt: blue\nSteps: 9, Sampler: DPM++ 2M Karras, "
        "Schedule type: Karras, CFG scale: 6, Seed: 12, Size: 128x128, Model hash: 0123abcd, Model: demo, "
        'Lora hashes: "ink: 0123abcd", Version: v1.10.1'
    )
    with caplog.at_level(logging.WARNING):
        job = _rerun(tmp_path, text)
    assert (job.prompt, job.negative_prompt, job.seed, job.model) == ("a red circle", "blue", 12, "demo")
    assert (job.prior_steps, job.prior_sampler, job.prior_guidance) == (9, "dpmpp_2m", 6.0)
    reference = Job.create(prompt="x", model="demo")  # what the text does not say: the preset's
    assert job.stage("decoder") == reference.stage("decoder") and job.prior_shift == reference.prior_shift
    assert job.emphasis == "original" and "<lora:ink:0.7>" in caplog.text and not job.loras


def test_from_png_still_reads_earlier_texts(tmp_path: Path) -> None:
    earlier = (
        "a red circle\nSteps: 5+3, Sampler: euler_ancestral+ddpm, CFG scale: 3.0+1.0, Seed: 9, "
        "Size: 128x128, Model: demo, Preset: reference, Shift: 3.0+1.5, CFG rescale: 0.5+0.0"
    )
    job = _rerun(tmp_path, earlier)
    assert (job.prior_steps, job.decoder_steps, job.prior_sampler, job.decoder_sampler) == (
        5, 3, "euler_ancestral", "ddpm")  # fmt: skip
    assert (job.prior_guidance, job.decoder_guidance, job.prior_shift, job.decoder_shift) == (
        3.0,
        1.0,
        3.0,
        1.5,
    )
    assert job.emphasis == "none"  # such texts' prompts were encoded as written
    one_sampler = infotext.parse("a\nSteps: 5+3, Sampler: ddim, CFG scale: 3.0+1.0, Seed: 9")
    assert one_sampler["prior_sampler"] == one_sampler["decoder_sampler"] == "ddim"
    reconstruct = infotext.parse("a\nTask: reconstruct, Steps: 7, Sampler: ddim, CFG scale: 1.5, Seed: 2")
    assert (reconstruct["decoder_steps"], reconstruct["decoder_guidance"]) == (7, 1.5)
    assert "prior_steps" not in reconstruct
    ours = infotext.parse("a\nTask: reconstruct, Stage B steps: 7, Stage B sampler: DDIM, Seed: 2")
    assert (ours["decoder_steps"], ours["decoder_sampler"]) == (7, "ddim")
