"""ControlNets in jobs and the engine: resolved and checked controls, their records, per-job
attachment, inpainting's kept region, super-resolution's doubled size, and the released files' names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from test_controlnet import random_controlnet
from test_controlnet_pipelines import CANNY, INPAINT, SUPER_RESOLUTION

import tiny
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.engine import (
    Engine,
    ImageDone,
    ImageRecord,
    Job,
    Loading,
    ModelSources,
    read_png,
    save_png,
)
from stable_cascade.engine.control import ControlRef
from stable_cascade.loading.bundles import BUNDLES, DEMO_DIR
from stable_cascade.loading.controlnets import controlnet_spec, controlnet_type

DEMO = ModelSources(model="demo")


def shape_picture(path: Path, size: tuple[int, int] = (128, 128), left: int = 70) -> str:
    """A white square on black (clear edges for canny), saved as ``path``."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[size[1] // 4 : size[1] // 2, left : left + size[0] // 4] = 255
    PIL.Image.fromarray(pixels).save(path)
    return str(path)


def half_mask(path: Path, size: int = 128) -> str:
    """White (generate) on the right half."""
    mask = np.zeros((size, size), np.uint8)
    mask[:, size // 2 :] = 255
    PIL.Image.fromarray(mask).save(path)
    return str(path)


def demo_job(**values: object) -> Job:
    settings: dict[str, object] = dict(prompt="a red circle", seed=3, dtype="fp32", models=DEMO)
    settings.update(prior_steps=3, decoder_steps=2)
    return Job.create(**{**settings, **values})  # type: ignore[arg-type]


def run_images(engine: Engine, job: Job) -> tuple[list[np.ndarray], list[object]]:
    events = list(engine.run(job))
    done = sorted((e for e in events if isinstance(e, ImageDone)), key=lambda e: e.index)
    return [np.asarray(e.image) for e in done], events


# -- jobs ------------------------------------------------------------------------------------------


def test_released_names_map_to_the_hub_files_and_the_demo_folder() -> None:
    for name in ("canny", "inpainting", "super_resolution"):
        expected = f"stabilityai/stable-cascade/controlnet/{name}.safetensors"
        assert controlnet_spec(name, BUNDLES["full"]) == expected
        assert controlnet_type(name) == name
    assert controlnet_spec("canny", BUNDLES["demo"]) == str(DEMO_DIR / "controlnet")
    assert controlnet_type(str(DEMO_DIR / "controlnet")) == "canny"
    for bundle, name in (("lite", "canny"), ("demo", "inpainting")):
        with pytest.raises(ValueError, match=f"the {bundle} model has no {name} ControlNet"):
            controlnet_spec(name, BUNDLES[bundle])


def test_controls_resolve_round_trip_and_are_checked(tmp_path: Path) -> None:
    image = shape_picture(tmp_path / "edges.png")
    job = demo_job(controls=[ControlRef("canny", image, scale=0.5)])
    (control,) = job.controls
    assert control.control_type == "canny" and control.image == str(Path(image).resolve())
    assert isinstance(control.image_sha256, str) and control.mask is None
    assert Job.from_dict(json.loads(job.to_json())) == job
    record = ImageRecord(job, seed=3, width=128, height=128)
    save_png(PIL.Image.new("RGB", (8, 8)), tmp_path / "x.png", record)
    assert read_png(tmp_path / "x.png").job.controls == job.controls
    assert "ControlNet: canny, Control type: canny, Control scale: 0.5" in record.infotext()
    folder = tmp_path / "cnet"
    random_controlnet(INPAINT).save_pretrained(folder)
    mask = half_mask(tmp_path / "mask.png")
    for change, expected in (
        ({"controls": [ControlRef("canny", str(tmp_path / "gone.png"))]}, "does not exist"),
        ({"controls": [ControlRef("canny", image, mask=mask)]}, "a mask is for inpainting"),
        ({"controls": [ControlRef(str(folder), image)]}, "inpainting needs a mask"),
        ({"controls": [ControlRef(str(folder), image, control_type="canny", mask=mask)]}, "takes inpainting"),
        ({"controls": [ControlRef("canny", image, scale=11.0)]}, r"control scale must be in \[0, 10\]"),
        ({"controls": [ControlRef("inpainting", image, mask=mask)]}, "demo model has no inpainting"),
        ({"controls": [ControlRef("canny", image)] * 2}, "a job takes one ControlNet"),
        (
            {"controls": [ControlRef("canny", image)], "models": ModelSources("lite")},
            "lite model has no canny",
        ),
        ({"controls": [ControlRef(str(tmp_path / "no.safetensors"), image)]}, "neither a released name"),
        ({"controls": [ControlRef(str(tmp_path / "x.ckpt"), image)]}, "pickle"),
    ):
        with pytest.raises(ValueError, match=expected):
            demo_job(**change)
    unknown = tmp_path / "unknown"
    random_controlnet(CANNY.replace(control_type=None)).save_pretrained(unknown)
    with pytest.raises(ValueError, match="cannot tell which control"):
        demo_job(controls=[ControlRef(str(unknown), image)])
    with pytest.raises(ValueError, match="reconstruct does not run"):
        Job.create(task="reconstruct", input_image_sha256="ab", image_size=(64, 64), controls=[control])
    data = job.to_dict()
    for change, expected in (
        ({"weight": 1}, r"unknown key 'weight'"),
        ({"control_scale": "1"}, r"control_scale must be a number"),
        ({"control_image_sha256": None}, "needs the control image sha256"),
        ({"controls": {}}, "controls must be a list"),  # an earlier, nested job
    ):
        with pytest.raises(ValueError, match=expected):
            Job.from_dict({**data, **change})


# -- running ---------------------------------------------------------------------------------------


def test_demo_canny_steers_its_job_only_and_stays_loaded(tmp_path: Path) -> None:
    image = shape_picture(tmp_path / "edges.png")
    controlled = demo_job(controls=[ControlRef("canny", image)])
    plain = demo_job()
    zero = demo_job(controls=[ControlRef("canny", image, scale=0.0)])
    fresh_plain = run_images(Engine(device="cpu"), plain)[0][0]
    engine = Engine(device="cpu")
    (with_control,), events = run_images(engine, controlled)
    assert [e.models for e in events if isinstance(e, Loading)] == ["demo", "ControlNet canny"]
    assert np.abs(with_control.astype(int) - fresh_plain.astype(int)).mean() > 1
    record = next(e for e in events if isinstance(e, ImageDone)).record
    assert record.job.controls == controlled.controls and "controlnet" in record.model_sha256
    assert np.array_equal(run_images(engine, plain)[0][0], fresh_plain)  # nothing of the control stays
    again, events = run_images(engine, controlled)
    assert np.array_equal(again[0], with_control) and not any(isinstance(e, Loading) for e in events)
    assert np.array_equal(run_images(engine, zero)[0][0], fresh_plain)  # scale 0: exactly no control
    prior = engine.load(DEMO, "fp32").prior_pipe
    assert prior is not None and prior.controlnet is None


def test_control_images_are_checked_before_any_work(tmp_path: Path) -> None:
    image = shape_picture(tmp_path / "edges.png")
    job = demo_job(controls=[ControlRef("canny", image)])
    shape_picture(tmp_path / "edges.png", left=10)  # the file changed since the job was made
    engine = Engine(device="cpu")
    with pytest.raises(ValueError, match="not the one the job names"):
        next(engine.run(job))
    Path(image).unlink()
    with pytest.raises(ValueError, match="does not exist"):
        next(engine.run(job))


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> ModelSources:
    prior, decoder = tiny.save_pipelines(tmp_path_factory.mktemp("control_engine"), effnet=True)
    return ModelSources(prior=str(prior), decoder=str(decoder))


def test_inpainting_keeps_the_unmasked_region(tiny_sources: ModelSources, tmp_path: Path) -> None:
    folder = tmp_path / "inpainting"
    random_controlnet(INPAINT).save_pretrained(folder)
    image = shape_picture(tmp_path / "photo.png")
    control = ControlRef(str(folder), image, mask=half_mask(tmp_path / "mask.png"))
    job = demo_job(models=tiny_sources, width=128, height=128, controls=[control])
    assert job.controls[0].control_type == "inpainting"
    (out,), _ = run_images(Engine(device="cpu"), job)
    source = prepare_images(PIL.Image.open(image).convert("RGB"), 128, 128)[0].permute(1, 2, 0).numpy()
    kept = (source * 255).round().astype(np.uint8)
    assert np.array_equal(out[:, :64], kept[:, :64])
    assert np.abs(out[:, 64:].astype(int) - kept[:, 64:].astype(int)).mean() > 5


def test_super_resolution_doubles_the_control_image(tiny_sources: ModelSources, tmp_path: Path) -> None:
    folder = tmp_path / "sr"
    random_controlnet(SUPER_RESOLUTION).save_pretrained(folder)
    image = shape_picture(tmp_path / "small.png", size=(64, 48), left=20)
    job = demo_job(models=tiny_sources, width=None, height=None, controls=[ControlRef(str(folder), image)])
    assert (job.width, job.height) == (128, 96)
    (out,), _ = run_images(Engine(device="cpu"), job)
    assert out.shape == (96, 128, 3)
    plain = job.replace(controls=())
    assert not np.array_equal(run_images(Engine(device="cpu"), plain)[0][0], out)
