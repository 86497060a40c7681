"""The engine: jobs resolved and checked once, their records, and runs on tiny local models (events,
the model cache, per-job LoRAs, cancellation, parity with the combined pipeline called directly)."""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import tiny
from stable_cascade.engine import (
    Engine,
    Finished,
    ImageDone,
    ImageRecord,
    Job,
    JobCancelled,
    Loading,
    ModelSources,
    Preview,
    Progress,
    image_sha256,
    read_png,
    save_png,
)
from stable_cascade.engine.models import load_models
from stable_cascade.nn.previewer import Previewer
from stable_cascade.specs import PreviewerConfig


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> ModelSources:
    prior, decoder = tiny.save_pipelines(tmp_path_factory.mktemp("engine"))
    return ModelSources(prior=str(prior), decoder=str(decoder))


def fast_job(sources: ModelSources, **values: object) -> Job:
    settings: dict[str, object] = dict(prompt="a red cat", width=128, height=128, seed=7, dtype="fp32")
    settings.update(prior_steps=2, decoder_steps=2, models=sources)
    return Job.create(**{**settings, **values})  # type: ignore[arg-type]


def images_of(engine: Engine, job: Job, **options: object) -> list[np.ndarray]:
    done = [e for e in engine.run(job, **options) if isinstance(e, ImageDone)]  # type: ignore[arg-type]
    return [np.asarray(e.image) for e in sorted(done, key=lambda e: e.index)]


# -- jobs ------------------------------------------------------------------------------------------


def test_create_resolves_every_default_once() -> None:
    job = Job.create(prompt="x", models=ModelSources(model="demo"))
    assert (job.width, job.height) == (128, 128)  # the demo's native size
    prior = job.prior_settings
    assert prior is not None and (prior.steps, prior.guidance, prior.shift) == (20, 4.0, 2.0)
    assert (job.decoder_steps, job.decoder_guidance) == (10, 1.1)
    assert 0 <= job.seed < 2**32 and job.models.model == "demo"
    assert (Job.create(prompt="x").width, Job.create(prompt="x").height) == (1024, 1024)
    img2img = Job.create(task="img2img", prompt="x", seed=3, batch_size=2, count=2, input_image_sha256="ab")
    assert img2img.strength == 0.8 and img2img.seeds == [3, 4, 5, 6]
    reconstruct = Job.create(task="reconstruct", input_image_sha256="ab", image_size=(130, 97))
    assert reconstruct.prior_settings is None and (reconstruct.width, reconstruct.height) == (128, 96)


LIMITS = {
    "width 0": ({"width": 0, "height": 128}, "width must be between 1 and 8192"),
    "not a multiple of 8": ({"width": 100, "height": 128}, "multiple of 8 pixels, got 100; try 96"),
    "too many pixels": ({"width": 8192, "height": 8192}, "more than the limit"),
    "steps": ({"prior_steps": 0}, "Stage C steps must be between 1 and 1000"),
    "many steps": ({"decoder_steps": 5000}, "Stage B steps must be between 1 and 1000"),
    "batch size": ({"batch_size": 0}, "batch size must be between 1 and 64"),
    "count": ({"count": -1}, "count must be between"),
    "guidance inf": ({"prior_guidance": float("inf")}, "Stage C guidance must be a finite number"),
    "shift nan": ({"prior_shift": float("nan")}, "Stage C shift must be a finite number"),
    "shift 0": ({"prior_shift": 0.0}, "Stage C shift must be in (0, 100]"),
    "strength nan": ({"task": "img2img", "strength": float("nan"), "input_image_sha256": "a"}, "finite"),
    "strength on txt2img": ({"strength": 0.5}, "strength applies to img2img only"),
    "surrogate prompt": ({"prompt": "a \udcff cat"}, "prompt is not valid UTF-8 text"),
    "sampler": ({"prior_sampler": "heun"}, "unknown Stage C sampler 'heun'"),
    "preset": ({"preset": "fast"}, "unknown preset 'fast'"),
    "model": ({"models": ModelSources(model="huge")}, "unknown model 'huge'"),
    "dtype": ({"dtype": "int8"}, "unknown dtype 'int8'"),
    "seed": ({"seed": -1}, "seed must be between 0 and"),
    "image without hash": ({"task": "variation"}, "variation needs the input image's sha256"),
    "missing LoRA": ({"loras": [("missing.safetensors", 1.0)]}, "LoRA file missing.safetensors does not"),
}


@pytest.mark.parametrize("mistake", LIMITS)
def test_create_refuses_what_cannot_run_with_one_line(mistake: str) -> None:
    values, expected = LIMITS[mistake]
    with pytest.raises(ValueError) as error:
        Job.create(**{"prompt": "x", **values})  # type: ignore[arg-type]
    assert expected in str(error.value) and "\n" not in str(error.value)


def test_from_dict_round_trips_and_is_strict() -> None:
    job = Job.create(prompt="x", seed=1, models=ModelSources(model="lite"))
    assert Job.from_dict(json.loads(job.to_json())) == job
    data = job.to_dict()
    for change, expected in (
        ({"colour": "red"}, "unknown key 'colour'"),
        ({"width": "128"}, "width must be a whole number"),
        ({"prior_steps": 2.5}, "prior_steps must be a whole number"),
        ({"prior": {"steps": 2.5}}, "prior_steps must be a whole number"),  # an earlier, nested job
        ({"model": 3}, "model must be text"),
        ({"loras": [{"path": "x", "size": 1}]}, "unknown key 'size' in loras[0]"),
        ({"height": 4}, "height must be a multiple of 8"),
    ):
        with pytest.raises(ValueError, match=r"^the record") as error:
            Job.from_dict({**data, **change}, "the record")
        assert expected in str(error.value), (change, str(error.value))


def test_records_round_trip_through_png_and_schema_1_stays_readable(tmp_path: Path) -> None:
    job = Job.create(prompt="a, b: c", negative_prompt="d", seed=4, count=3, width=256, height=128)
    record = ImageRecord(job, index=2, seed=6, width=256, height=128, model_sha256={"prior": "ab"})
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "x.png", record)
    assert read_png(tmp_path / "x.png") == record
    assert record.single_job() == dataclasses.replace(job, seed=6, count=1)
    text = record.infotext()
    assert "a, b: c\nNegative prompt: d\nSteps: 20, Sampler: DDPM, CFG scale: 4.0, Seed: 6" in text
    assert "Stage B steps: 10, Stage B CFG scale: 1.1, Stage B sampler: DDPM, Stage B shift: 1.0" in text
    old = {"schema": 1, "task": "txt2img", "prompt": "p", "negative_prompt": "", "seed": 9, "width": 128}
    old.update(height=128, preset="reference", dtype="fp32", models={"model": "demo"}, batch_index=1)
    old["prior"] = {"steps": 3, "guidance": 4.0, "sampler": "ddpm", "shift": 2.0, "rescale": 0.7}
    old["decoder"] = {"steps": 2, "guidance": 1.1, "sampler": "ddim", "shift": 1.0, "rescale": 0.0}
    read = ImageRecord.from_json(json.dumps(old))
    assert read.seed == 9 and read.job.models.model == "demo" and read.job.decoder_sampler == "ddim"
    with pytest.raises(ValueError, match="is not in its job"):
        ImageRecord.from_json(json.dumps({**record.to_dict(), "seed": 99}))


# -- running ---------------------------------------------------------------------------------------


def test_images_equal_the_combined_pipeline_called_directly(sources: ModelSources) -> None:
    job = fast_job(sources, batch_size=2, negative_prompt="blurry")
    engine = Engine(device="cpu")
    events = list(engine.run(job))
    pipeline = load_models(sources, torch_dtype=torch.float32).pipeline
    pipeline.set_progress_bar_config(disable=True)
    assert job.prior_settings is not None
    direct = pipeline(  # type: ignore[call-arg]
        "a red cat",
        negative_prompt="blurry",
        height=128,
        width=128,
        num_images_per_prompt=2,
        generator=[torch.Generator().manual_seed(seed) for seed in (7, 8)],
        preset="reference",
        prior_num_inference_steps=2,
        num_inference_steps=2,
    ).images
    done = [e for e in events if isinstance(e, ImageDone)]
    assert [e.index for e in done] == [0, 1] and [e.record.seed for e in done] == [7, 8]
    for event, image in zip(done, direct, strict=True):
        assert np.array_equal(np.asarray(event.image), np.asarray(image))
    assert done[1].record.job.dtype == "fp32" and set(done[1].record.model_sha256) == {"prior", "decoder"}
    assert isinstance(events[0], Loading) and isinstance(events[-1], Finished)
    progress = [e for e in events if isinstance(e, Progress)]
    assert [(e.stage, e.step) for e in progress] == [
        ("prior", 1),
        ("prior", 2),
        ("decoder", 1),
        ("decoder", 2),
    ]
    assert progress[-1].fraction == 1.0 and all(
        a.fraction < b.fraction for a, b in itertools.pairwise(progress)
    )


def test_models_stay_loaded_and_loras_apply_to_their_job_only(sources: ModelSources, tmp_path: Path) -> None:
    first, second = (
        tiny.lora_file(tmp_path / "a.safetensors", 1),
        tiny.lora_file(tmp_path / "b.safetensors", 2),
    )
    jobs = {
        "plain": fast_job(sources),
        "a": fast_job(sources, loras=[(first, 1.0)]),
        "b": fast_job(sources, loras=[(second, 0.7), (first, 0.5)]),
    }
    fresh = {name: images_of(Engine(device="cpu"), job)[0] for name, job in jobs.items()}
    assert not np.array_equal(fresh["a"], fresh["plain"]) and not np.array_equal(fresh["a"], fresh["b"])
    engine = Engine(device="cpu")
    for name in ("a", "b", "plain", "b"):
        events = list(engine.run(jobs[name]))
        assert not any(isinstance(e, Loading) for e in events[1:])
        done = [e for e in events if isinstance(e, ImageDone)]
        assert np.array_equal(np.asarray(done[0].image), fresh[name]), name
    assert any(isinstance(e, Loading) for e in Engine(device="cpu").run(jobs["plain"]))
    prior = engine.load(sources, "fp32").prior_pipe
    assert prior is not None and prior.get_active_adapters() == []
    assert not any(isinstance(m, nn.Linear) and hasattr(m, "lora_adapters") for m in prior.prior.modules())


def test_cancel_stops_between_steps_and_the_engine_runs_on(sources: ModelSources) -> None:
    engine, cancel = Engine(device="cpu"), threading.Event()
    seen: list[object] = []
    with pytest.raises(JobCancelled):
        for event in engine.run(fast_job(sources, count=3, prior_steps=4), cancel=cancel):
            seen.append(event)
            if isinstance(event, Progress) and event.step == 2:
                cancel.set()
    assert not any(isinstance(e, ImageDone) for e in seen)
    assert sum(isinstance(e, Progress) for e in seen) == 2  # the step after the cancel never ran
    assert len(images_of(engine, fast_job(sources))) == 1


def test_previews_and_the_checks_before_any_work(sources: ModelSources, tmp_path: Path) -> None:
    previewer = tmp_path / "previewer.safetensors"  # else the bundle's, from the Hub
    torch.manual_seed(0)
    save_file(Previewer(PreviewerConfig(c_hidden=8)).state_dict(), previewer)
    engine = Engine(device="cpu")
    with_previewer = dataclasses.replace(sources, previewer=str(previewer))
    previews = [e for e in engine.run(fast_job(with_previewer), previews=True) if isinstance(e, Preview)]
    assert [(p.index, p.step) for p in previews] == [(0, 0), (0, 1)]
    image = PIL.Image.new("RGB", (64, 64), "red")
    variation = fast_job(sources, task="variation", input_image_sha256=image_sha256(image))
    with pytest.raises(ValueError, match="variation needs an input image"):
        next(engine.run(variation))
    with pytest.raises(ValueError, match="not the one the job names"):
        next(engine.run(variation, PIL.Image.new("RGB", (64, 64), "blue")))
    with pytest.raises(ValueError, match="txt2img takes no input image"):
        next(engine.run(fast_job(sources), image))
