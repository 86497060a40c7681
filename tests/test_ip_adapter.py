"""IP-Adapter for Stage C on tiny models: decoupled attention (a fresh adapter attends to its tokens as
the blocks attend to CLIP tokens), scale 0 and detaching give the base model bit for bit, the file
format (two key groups) round trips, a file for another prior is refused in one line, training lowers
the loss and resumes exactly, and an engine runs jobs with different adapters one after another."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import tiny
from stable_cascade import StableCascadePriorPipeline, StableCascadeUNet
from stable_cascade.engine import Engine, ImageDone, Job, ModelSources
from stable_cascade.lora.ip_adapter import load_ip_adapter, save_ip_adapter
from stable_cascade.nn.ip_adapter import attach_ip_adapter, attention_blocks, new_ip_adapter
from stable_cascade.nn.layers import AttnBlock
from stable_cascade.specs import UNET_VARIANTS
from stable_cascade.training import Components, TrainConfig, train
from stable_cascade.training.components import init_unet
from stable_cascade.training.ip_adapter_task import IP_ADAPTER_FILE

RUN = {"height": 128, "width": 128, "num_inference_steps": 3, "guidance_scale": 3.0}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableCascadePriorPipeline:
    return tiny.image_prior_pipeline(tmp_path_factory.mktemp("tokenizer"))


def latents(pipe: StableCascadePriorPipeline, **kwargs: object) -> torch.Tensor:
    return pipe("a red circle", **RUN, **kwargs, generator=seeded()).image_embeddings  # type: ignore[arg-type]


def test_a_fresh_adapter_attends_to_its_tokens_as_the_block_to_clip_tokens() -> None:
    unet = tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), 1)
    adapter = new_ip_adapter(unet, tiny.IMAGE_WIDTH)
    tokens = torch.randn(2, 5, tiny.TINY_PRIOR.conditioning_dim)
    blocks = attention_blocks(unet)
    assert len(blocks) == len(adapter.ip_adapter) == sum(isinstance(m, AttnBlock) for m in unet.modules())
    for block, ip in zip(blocks, adapter.ip_adapter, strict=True):
        key, value = ip(tokens)
        expected = block.prepare(tokens)
        torch.testing.assert_close(key, expected.key, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(value, expected.value, atol=1e-5, rtol=1e-5)


def test_scale_zero_and_detaching_give_the_base_model_bit_for_bit(pipe: StableCascadePriorPipeline) -> None:
    weights = {k: v.clone() for k, v in pipe.prior.state_dict().items()}
    text_only = latents(pipe)
    prompted = latents(pipe, images=[picture(1)])
    name = pipe.load_ip_adapter(tiny.ip_adapter(3), scale=0.0)
    assert torch.equal(latents(pipe, images=[picture(1)]), text_only)  # the adapter takes the images over
    assert torch.equal(latents(pipe), text_only)
    pipe.set_ip_adapter_scale(1.0)
    adapted = latents(pipe, images=[picture(1)])
    assert not torch.allclose(adapted, text_only) and not torch.allclose(adapted, prompted)
    assert torch.equal(latents(pipe), text_only)  # no image prompt: the adapter has nothing to add
    pipe.set_ip_adapter_scale(0.5, name)
    assert not torch.allclose(latents(pipe, images=[picture(1)]), adapted)
    pipe.unload_ip_adapter()
    assert pipe.get_ip_adapters() == [] and pipe.prior.ip_adapters == {}
    assert pipe.prior.state_dict().keys() == weights.keys()
    assert all(torch.equal(pipe.prior.state_dict()[k], v) for k, v in weights.items())
    assert torch.equal(latents(pipe, images=[picture(1)]), prompted)


def test_patch_token_adapters_read_the_image_through_a_resampler(pipe: StableCascadePriorPipeline) -> None:
    text_only = latents(pipe)
    pipe.load_ip_adapter(tiny.ip_adapter(4, patches=True), adapter_name="plus")
    try:
        got = latents(pipe, images=[picture(2)], negative_images=[picture(3)])
        assert got.shape == text_only.shape and not torch.allclose(got, text_only)
        with pytest.raises(ValueError, match="read images' patch tokens: pass images, not image_embeds"):
            latents(pipe, image_embeds=torch.zeros(1, 1, tiny.IMAGE_WIDTH))
        with pytest.raises(ValueError, match="attach adapters of one image input together"):
            pipe.load_ip_adapter(tiny.ip_adapter(5))
    finally:
        pipe.unload_ip_adapter("plus")


@pytest.mark.parametrize("patches", [False, True])
def test_files_hold_two_key_groups_and_round_trip(tmp_path: Path, patches: bool) -> None:
    adapter = tiny.ip_adapter(6, patches=patches)
    path = save_ip_adapter(tmp_path / "ip.safetensors", adapter, {"note": "test"})
    with safe_open(str(path), framework="pt") as handle:
        groups = {key.split(".")[0] for key in handle.keys()}  # noqa: SIM118
        assert handle.metadata()["note"] == "test"
    assert groups == {"image_proj", "ip_adapter"}
    loaded = load_ip_adapter(path)
    assert loaded.config == adapter.config
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in adapter.state_dict().items())
    if not patches:  # a file of the usual key layout without our metadata: the config from the shapes
        save_file(load_file(path), tmp_path / "plain.safetensors")
        assert load_ip_adapter(tmp_path / "plain.safetensors").config == adapter.config


def test_files_for_another_prior_and_broken_files_get_one_line(
    pipe: StableCascadePriorPipeline, tmp_path: Path
) -> None:
    other = UNET_VARIANTS["tiny_prior"].replace(block_out_channels=(32, 48), num_attention_heads=(2, 2))
    path = save_ip_adapter(tmp_path / "other.safetensors", tiny.ip_adapter(7, config=other))
    save_file({"unet.x": torch.zeros(2)}, tmp_path / "lora.safetensors")
    (tmp_path / "broken.safetensors").write_bytes(b"not a file")
    cases = {
        str(path): "is for another Stage C architecture",
        str(tmp_path / "lora.safetensors"): "is not an IP-Adapter file: expected the key groups",
        str(tmp_path / "broken.safetensors"): "is not a readable safetensors file",
        str(tmp_path / "missing.safetensors"): "does not exist",
    }
    for file, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            pipe.load_ip_adapter(file)
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="IP-Adapter scale must be a finite number"):
        pipe.load_ip_adapter(tiny.ip_adapter(8), scale=float("nan"))
    assert pipe.get_ip_adapters() == []
    decoder = StableCascadeUNet(tiny.TINY_DECODER)
    with pytest.raises(ValueError, match="it cannot attach to a Stage B"):
        attach_ip_adapter(decoder, tiny.ip_adapter(9), "x", 1.0)  # type: ignore[arg-type]


def ip_data(folder: Path) -> Path:
    """Four captioned images of coloured squares."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(4):
        pixels = np.zeros((64, 64, 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        pixels[16:40, 20:44] = rng.integers(0, 255, 3)
        PIL.Image.fromarray(pixels).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"a square number {index}")
    return folder


def ip_parts(tmp: Path) -> Components:
    from stable_cascade.nn.effnet import EfficientNetEncoder
    from stable_cascade.specs import EffNetConfig

    torch.manual_seed(0)
    effnet = EffNetConfig(stage_channels=(8, 8, 8, 8, 8, 8), stage_depths=(1,) * 6, head_channels=16)
    return Components(
        prior=tiny.randomize_(init_unet(StableCascadeUNet(tiny.TINY_PRIOR)), 0, scale=0.1),
        effnet=EfficientNetEncoder(effnet).eval(),
        tokenizer=tiny.tokenizer(tmp / "tokenizer"),
        text_encoder=tiny.text_encoder(),
        image_encoder=tiny.image_encoder(),
        feature_extractor=tiny.feature_extractor(),
    )


def test_training_lowers_the_loss_resumes_exactly_and_keeps_the_prior(tmp_path: Path) -> None:
    data = ip_data(tmp_path / "data")
    common = {"task": "ip-adapter", "data": data, "resolution": 64, "batch_size": 4, "lr": 3e-3}
    common |= {"ema_decay": 0.9, "checkpoint_every": 3, "log_every": 1000, "ip_adapter_image_dropout": 0.0}
    parts = ip_parts(tmp_path)
    prior = {k: v.clone() for k, v in parts.prior.state_dict().items()}  # type: ignore[union-attr]
    from stable_cascade.training import make_task

    task = make_task(TrainConfig(output_dir=tmp_path / "probe", steps=1, **common), ip_parts(tmp_path))
    batch = next(iter(_batches(task, data)))

    def loss() -> float:
        with torch.no_grad():
            inputs = task.prepare(batch, seeded(5))
            return float(task.trainee(**inputs)["loss"].mean())

    before = loss()
    final = train(TrainConfig(output_dir=tmp_path / "straight", steps=6, **common), parts)
    trained = load_ip_adapter(final / IP_ADAPTER_FILE)
    task.adapter.load_state_dict(trained.state_dict())  # type: ignore[attr-defined]
    assert loss() < before
    assert all(torch.equal(parts.prior.state_dict()[k], v) for k, v in prior.items())  # type: ignore[union-attr]
    train(TrainConfig(output_dir=tmp_path / "resumed", steps=3, **common), ip_parts(tmp_path))
    train(
        TrainConfig(output_dir=tmp_path / "resumed", steps=6, resume="latest", **common), ip_parts(tmp_path)
    )
    for name in ("model", "ema"):
        straight = load_file(tmp_path / "straight" / "checkpoint-6" / f"{name}.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoint-6" / f"{name}.safetensors")
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    assert {k.split(".")[0] for k in load_file(final / IP_ADAPTER_FILE)} == {"image_proj", "ip_adapter"}


def _batches(task: object, data: Path) -> object:
    from stable_cascade.training.data import bucketed_dataset, collate, find_examples

    dataset, groups = bucketed_dataset(find_examples(data), 64, (1.0,), 32)
    return [collate([dataset[i] for i in groups[0][:4]])]


def test_the_adapter_learns_from_the_image_prompts_a_manifest_names(tmp_path: Path) -> None:
    """The adapter's input is the image prompt of an example that names one, its own image otherwise."""
    import json

    from stable_cascade.training import make_task

    data = ip_data(tmp_path / "data")
    lines = [
        {"file_name": "0.png", "text": "a square", "image_prompt": "1.png"},
        {"file_name": "1.png", "text": ""},
    ]
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(line) for line in lines))
    config = TrainConfig(task="ip-adapter", data=data, output_dir=tmp_path / "run", resolution=64)
    parts = ip_parts(tmp_path)
    task = make_task(config.replace(ip_adapter_image_dropout=0.0), parts)
    (batch,) = _batches(task, data)  # type: ignore[misc]
    given = task.prepare(batch, seeded(0))["ip_image"]
    pixels = parts.feature_extractor(list(batch.images[1:]), do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        second = parts.image_encoder(pixels.pixel_values).image_embeds  # type: ignore[misc]
    torch.testing.assert_close(given[0, 0], second[0])  # the first sample's prompt is the second image
    torch.testing.assert_close(given[1, 0], second[0])


def test_ip_adapter_training_needs_the_image_encoder(tmp_path: Path) -> None:
    parts = ip_parts(tmp_path)
    parts.image_encoder = None
    config = TrainConfig(task="ip-adapter", data=ip_data(tmp_path / "data"), output_dir=tmp_path / "run")
    with pytest.raises(ValueError, match="ip-adapter needs the CLIP image encoder"):
        train(config.replace(resolution=64, steps=1), parts)


@pytest.mark.slow
def test_jobs_with_different_adapters_share_one_engine(tmp_path: Path) -> None:
    """As a server's engine runs them: each job's adapters attach for it alone."""
    prior, decoder = tiny.save_pipelines(tmp_path / "models")
    sources = ModelSources(prior=str(prior), decoder=str(decoder))
    image = tmp_path / "prompt.png"
    picture(11).save(image)
    files = [save_ip_adapter(tmp_path / f"{n}.safetensors", tiny.ip_adapter(n)) for n in (1, 2)]

    def job(*adapters: tuple[Path, float]) -> Job:
        values: dict[str, object] = {"prompt": "a red cat", "width": 128, "height": 128, "seed": 7}
        values |= {"dtype": "fp32", "prior_steps": 2, "decoder_steps": 2, "models": sources}
        values |= {"image_prompts": [(image, 1.0)], "ip_adapters": list(adapters)}
        return Job.create(**values)  # type: ignore[arg-type]

    def made(engine: Engine, one: Job) -> np.ndarray:
        done = [e for e in engine.run(one) if isinstance(e, ImageDone)]
        assert done[0].record.job.ip_adapters == one.ip_adapters  # with their sha256
        return np.asarray(done[0].image)

    jobs = {"a": job((files[0], 1.0)), "b": job((files[1], 0.8)), "none": job()}
    fresh = {name: made(Engine(device="cpu"), one) for name, one in jobs.items()}
    assert not np.array_equal(fresh["a"], fresh["b"]) and not np.array_equal(fresh["a"], fresh["none"])
    engine = Engine(device="cpu")
    for name in ("a", "b", "none", "a"):
        assert np.array_equal(made(engine, jobs[name]), fresh[name]), name
    assert engine.load(sources, "fp32").prior_pipe.prior.ip_adapters == {}  # type: ignore[union-attr]
