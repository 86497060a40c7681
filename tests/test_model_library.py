"""A models folder (``serve --models DIR``): what it offers by name, what it leaves out and why, and jobs
that name its entries (the server refuses anything else)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from safetensors.torch import save_file

from stable_cascade.convert import Kind, to_original_state_dict
from stable_cascade.engine import Engine, ImageDone, Job, LoraRef, ModelLibrary, ModelSources, available
from stable_cascade.loading.bundles import DEMO_DIR
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.server.models import check_served, checkpoint_size, job_names, lora_refs, model_info

DEMO_PRIOR, DEMO_DECODER = str(DEMO_DIR / "prior"), str(DEMO_DIR / "decoder")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every kind of checkpoint (from the demo's Stage C), entries that are not one, a LoRA, a ControlNet."""
    root = tmp_path_factory.mktemp("models")
    checkpoints = root / "Stable-diffusion"  # AUTOMATIC1111's folder name
    checkpoints.mkdir()
    unet = StableCascadeUNet.from_pretrained(str(DEMO_DIR / "prior" / "prior"))
    original = {k: v.contiguous() for k, v in to_original_state_dict(unet.state_dict(), Kind.STAGE_C).items()}
    save_file(original, checkpoints / "single.safetensors")
    save_file(
        {f"model.diffusion_model.{k}": v for k, v in original.items()}, checkpoints / "bundle.safetensors"
    )
    for name, target in (
        ("cascade", DEMO_DIR),
        ("prior_pipeline", DEMO_DIR / "prior"),
        ("unet_folder", DEMO_DIR / "prior" / "prior"),
        ("decoder_pipeline", DEMO_DIR / "decoder"),
        ("demo", DEMO_DIR),
    ):
        (checkpoints / name).symlink_to(target)
    (checkpoints / "broken.safetensors").write_bytes(b"not a checkpoint")
    (checkpoints / "notes.txt").write_text("not offered")
    (root / "loras" / "styles").mkdir(parents=True)
    (root / "loras" / "styles" / "ink.safetensors").write_bytes(b"a LoRA file (never loaded here)")
    (root / "controlnet").mkdir()
    (root / "controlnet" / "edges").symlink_to(DEMO_DIR / "controlnet")
    return root


def test_each_kind_of_checkpoint_is_offered_by_name_and_the_rest_left_out_with_a_reason(
    folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, "stable_cascade.engine.library"):
        library = ModelLibrary(folder)
    demo = {"model": "demo", "components": DEMO_PRIOR}  # a demo-shaped Stage C: the demo's text encoder
    assert {name: c.sources for name, c in library.checkpoints.items()} == {
        "bundle": ModelSources(prior=str(folder / "Stable-diffusion" / "bundle.safetensors"), **demo),
        "cascade": ModelSources(model="demo", prior=DEMO_PRIOR, decoder=DEMO_DECODER),
        "prior_pipeline": ModelSources(model="demo", prior=DEMO_PRIOR),
        "single": ModelSources(prior=str(folder / "Stable-diffusion" / "single.safetensors"), **demo),
        "unet_folder": ModelSources(prior=str(DEMO_DIR / "prior" / "prior"), **demo),
    }
    reasons = " | ".join(caplog.messages)
    for expected in (
        "decoder_pipeline is left out: a StableCascadeDecoderPipeline folder",
        "demo is left out: the name demo is taken",
        "broken.safetensors is left out",
    ):
        assert expected in reasons, reasons
    assert "notes.txt" not in reasons
    assert library.model_names() == ["full", "lite", "demo", *library.checkpoints]
    assert library.sources("demo") == ModelSources(model="demo")
    with pytest.raises(ValueError, match="unknown model 'nope'; expected one of full, lite, demo, bundle"):
        library.sources("nope")
    assert (
        library.name_of(library.sources("cascade")) == "cascade" and library.name_of(ModelSources()) is None
    )
    assert list(library.loras) == ["ink"] and list(library.controlnets) == ["edges"]
    assert available(library.sources("single")) and available(ModelSources(model="demo"))
    info = model_info(library)
    assert info["single"]["size"] == 128 and info["single"]["controlnets"] == ["canny", "edges"]
    assert info["single"]["description"] == "Stable-diffusion/single.safetensors (demo)"
    (folder / "loras" / "more.safetensors").write_bytes(b"another")
    assert "more" not in library.loras
    library.refresh()
    assert "more" in library.loras
    (folder / "loras" / "more.safetensors").unlink()
    with pytest.raises(ValueError, match="does not exist"):
        ModelLibrary(folder / "missing")


def test_jobs_name_the_folders_entries_and_the_server_refuses_other_files(folder: Path) -> None:
    library = ModelLibrary(folder)
    refs = lora_refs(library, [{"name": "ink", "scale": 0.5}, "ink:0.25", "ink"])
    assert [(Path(ref.path).name, ref.scale) for ref in refs] == [
        ("ink.safetensors", s) for s in (0.5, 0.25, 1.0)
    ]
    for wrong, message in (("nope", "unknown LoRA 'nope'"), ([{"name": "ink", "scale": "x"}], "a number"),
                           ([{"path": "/etc/passwd"}], "is {")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            lora_refs(library, wrong if isinstance(wrong, list) else [wrong])
    arguments = {"models": library.sources("single"), "loras": refs[:1], "prompt": "a red circle"}
    checkpoint_size(arguments)  # a demo-shaped checkpoint: the demo's 128, not the 1024 of unknown ones
    job = Job.create(**arguments)
    assert (job.width, job.height) == (128, 128)
    check_served(job, library)
    assert job_names(library, job.to_dict()) == {
        "model_name": "single",
        "lora_names": ["ink"],
        "controlnet_name": None,
    }
    elsewhere = LoraRef(str(folder / "Stable-diffusion" / "single.safetensors"), 1.0)
    for changed in (
        job.replace(prior=str(DEMO_DIR / "previewer.safetensors")),
        job.replace(loras=(elsewhere,)),
    ):
        with pytest.raises(ValueError, match="the server"):
            check_served(changed, library)


def test_single_files_and_bundles_of_the_folder_run(folder: Path) -> None:
    library = ModelLibrary(folder)
    engine = Engine(device="cpu")
    images = []
    for name in ("single", "bundle", "demo"):
        job = Job.create(models=library.sources(name), prompt="a red circle", seed=1, prior_steps=3,
                         decoder_steps=2, width=128, height=128)  # fmt: skip
        images.append(next(e for e in engine.run(job) if isinstance(e, ImageDone)).image.tobytes())
    assert images[0] == images[1]  # the same weights, in a file and in a ComfyUI bundle
