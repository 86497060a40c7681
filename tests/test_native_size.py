"""Models derived from the demo keep its native 128² size: a retrained or fine-tuned demo prior, in
any layout, is recognised by its architecture, so ``generate --prior`` and ``train --pretrained``
without a size use 128 (1024 would give garbage, 3x slower); other models keep 1024."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import tiny
from stable_cascade import StableCascadePriorPipeline, StableCascadeUNet
from stable_cascade.cli.main import build_parser
from stable_cascade.cli.train import config_from_args
from stable_cascade.loading.bundles import BUNDLES, DEMO_DIR
from stable_cascade.loading.native import DEMO_SIZE, model_native_size, native_size
from stable_cascade.loading.sources import ModelSources
from stable_cascade.training import TrainConfig

pytestmark = pytest.mark.skipif(
    not (DEMO_DIR / "prior" / "model_index.json").is_file(), reason="the demo cascade is not shipped here"
)


@pytest.fixture(scope="module")
def retrained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A demo prior with other (random) weights, as a model folder, a diffusers file, an original single
    file and a ComfyUI bundle; and a model of another architecture."""
    root = tmp_path_factory.mktemp("retrained")
    demo = StableCascadeUNet.from_pretrained(DEMO_DIR / "prior", subfolder="prior")
    unet = tiny.randomize_(StableCascadeUNet(demo.config), seed=3)
    unet.save_pretrained(root / "folder")
    original = {k: v.contiguous() for k, v in unet.to_single_file_state_dict().items()}
    save_file(original, root / "stage_c.safetensors")
    save_file({f"model.diffusion_model.{k}": v for k, v in original.items()}, root / "comfy.safetensors")
    StableCascadeUNet(tiny.TINY_PRIOR).save_pretrained(root / "other")
    return {
        "model folder": root / "folder",
        "diffusers file": root / "folder" / "diffusion_pytorch_model.safetensors",
        "original file": root / "stage_c.safetensors",
        "ComfyUI bundle": root / "comfy.safetensors",
        "pipeline folder": DEMO_DIR / "prior",
        "other": root / "other",
    }


@pytest.mark.parametrize(
    "layout", ["model folder", "diffusers file", "original file", "ComfyUI bundle", "pipeline folder"]
)
def test_a_demo_prior_in_any_layout_is_native_at_128(retrained: dict[str, Path], layout: str) -> None:
    spec = str(retrained[layout])
    assert model_native_size(spec, "prior") == DEMO_SIZE == 128
    assert native_size(ModelSources(prior=spec)) == 128
    assert native_size(ModelSources(model="demo", prior=spec)) == 128


def test_other_models_have_no_known_native_size(retrained: dict[str, Path], tmp_path: Path) -> None:
    assert native_size(ModelSources(prior=str(retrained["other"]))) is None
    assert native_size(ModelSources(prior="stabilityai/stable-cascade-prior")) is None  # nothing downloaded
    assert native_size(ModelSources(prior=str(tmp_path / "missing.safetensors"))) is None
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not safetensors")
    assert native_size(ModelSources(prior=str(broken))) is None
    # without --prior, the bundle's size
    assert native_size(ModelSources()) == native_size(ModelSources(model="lite")) == 1024
    assert native_size(ModelSources(model="demo")) == 128


def test_the_demo_decoder_and_stage_a_are_recognised() -> None:
    assert model_native_size(DEMO_DIR / "decoder", "decoder") == 128
    assert model_native_size(DEMO_DIR / "decoder", "vqgan") == 128
    assert model_native_size(DEMO_DIR / "decoder", "prior") is None  # no prior in that folder


def config_for(argv: list[str]) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_training_a_demo_derived_model_defaults_to_128(retrained: dict[str, Path], tmp_path: Path) -> None:
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    common = ["--data", data, "-o", out]
    assert config_for(["lora", "--pretrained", str(DEMO_DIR / "prior"), *common]).resolution == 128
    assert config_for(["lora", "--prior", str(retrained["original file"]), *common]).resolution == 128
    assert config_for(["stage-c", "--pretrained", str(DEMO_DIR / "prior"), *common]).resolution == 128
    assert config_for(["stage-b", "--pretrained", str(DEMO_DIR / "decoder"), *common]).resolution == 128
    assert config_for(["stage-a", "--pretrained", str(DEMO_DIR / "decoder"), *common]).resolution == 128
    assert config_for(["stage-c", "--init-config", "demo_prior", *common]).resolution == 128
    # an explicit size wins; other models keep 1024
    assert (
        config_for(
            ["lora", "--pretrained", str(DEMO_DIR / "prior"), "--resolution", "256", *common]
        ).resolution
        == 256
    )
    assert config_for(["lora", "--prior", str(retrained["other"]), *common]).resolution == 1024
    assert config_for(["stage-c", "--init-config", "tiny_prior", *common]).resolution == 1024
    assert TrainConfig(task="stage-a", data=data, output_dir=out).resolution == 1024
    # a resumed run reads its stored resolution back unchanged
    config = TrainConfig(task="lora", data=data, output_dir=out, pretrained=DEMO_DIR / "prior")
    assert TrainConfig.from_dict(config.to_dict()).resolution == 128


def test_a_demo_prior_file_takes_its_other_parts_from_the_demo_bundle(retrained: dict[str, Path]) -> None:
    """What ``--model demo --prior FILE`` loads: the parts the file lacks from the demo's own prior
    folder (offline), not from the Hub repo of the released models."""
    repo = ModelSources(model="demo", prior=str(retrained["original file"])).bundle.prior_repo
    assert repo == BUNDLES["demo"].prior_repo == str(DEMO_DIR / "prior")
    pipe = StableCascadePriorPipeline.from_single_file(retrained["original file"], components_repo=repo)
    demo = StableCascadePriorPipeline.from_pretrained(DEMO_DIR / "prior")
    assert pipe.text_encoder.config.hidden_size == demo.text_encoder.config.hidden_size
    assert pipe.tokenizer("a red circle").input_ids == demo.tokenizer("a red circle").input_ids
    pipe.set_progress_bar_config(disable=True)
    out = pipe("a red circle", height=128, width=128, num_inference_steps=2, generator=torch.Generator())
    assert out.image_embeddings.shape[-2:] == (3, 3)  # the demo's Stage C latent


@pytest.mark.slow
def test_demo_files_given_alone_take_the_rest_from_the_demo(tmp_path: Path) -> None:
    """``--model demo --decoder FILE`` (Stage A from the demo) and ``--model demo --prior FILE`` with
    img2img (the EfficientNet encoder from the demo) run offline, at the demo's 128²."""
    import PIL.Image

    from stable_cascade.engine import Engine, Finished, Job, image_sha256

    for stage in ("prior", "decoder"):
        unet = StableCascadeUNet.from_pretrained(DEMO_DIR / stage / stage)
        save_file(
            {k: v.contiguous() for k, v in unet.state_dict().items()}, tmp_path / f"{stage}.safetensors"
        )
    image = PIL.Image.new("RGB", (128, 128), (200, 30, 30))
    engine = Engine(device="cpu")
    for stage in ("decoder", "prior"):
        job = Job.create(
            task="img2img", prompt="a red circle", model="demo", seed=1, prior_steps=2, decoder_steps=2,
            input_image_sha256=image_sha256(image), **{stage: str(tmp_path / f"{stage}.safetensors")},
        )  # fmt: skip
        assert (job.width, job.height) == (128, 128)
        assert isinstance(list(engine.run(job, image))[-1], Finished)
