"""Training (``stable_cascade.training`` and ``stable-cascade train``) on tiny models and tiny images.

Every test builds its models and data here (nothing is downloaded): a few steps on a fixed batch
must lower the loss of each task, a resumed run must end bit for bit where an uninterrupted one
does, checkpoints must be safetensors and JSON only, and two CPU processes (gloo) must train as one.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

import tiny
from stable_cascade.cli.main import main
from stable_cascade.diffusion.cosine import noise_cond
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
from stable_cascade.pipelines.prior import StableCascadePriorPipeline
from stable_cascade.specs import EffNetConfig, PreviewerConfig
from stable_cascade.training import Components, Task, TrainConfig, make_task, train
from stable_cascade.training.components import init_stage_a, init_unet, load_components
from stable_cascade.training.data import (
    Batch,
    BucketBatchSampler,
    bucket_sizes,
    bucketed_dataset,
    collate,
    find_examples,
    group_by_bucket,
)
from stable_cascade.training.objective import LossWeights, diffuse, drop_captions

ROOT = Path(__file__).resolve().parents[1]
TINY_EFFNET = EffNetConfig(stage_channels=(8, 8, 8, 8, 8, 8), stage_depths=(1,) * 6, head_channels=16)
TINY_PREVIEWER = PreviewerConfig(c_hidden=16)
#: Per task: image side and learning rate for the fixed-batch runs.
SETTINGS = {
    "stage-c": (128, 3e-3),
    "stage-b": (64, 3e-3),
    "stage-a": (32, 3e-3),
    "lora": (128, 1e-2),
    "previewer": (128, 1e-2),
}


def write_images(folder: Path, sizes: list[tuple[int, int]], captions: bool = True) -> list[str]:
    """Coloured rectangles of the given (height, width) as PNGs with .txt captions; the captions."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(sizes))
    texts = []
    for index, (h, w) in enumerate(sizes):
        pixels = np.zeros((h, w, 3), np.uint8)
        pixels[:] = rng.integers(0, 255, 3)
        pixels[h // 4 : h // 2, w // 3 : w // 2] = rng.integers(0, 255, 3)
        PIL.Image.fromarray(pixels).save(folder / f"{index:03d}.png")
        texts.append(f"a rectangle number {index}")
        if captions:
            (folder / f"{index:03d}.txt").write_text(texts[-1])
    return texts


def components(tmp: Path, fresh_prior: bool = True) -> Components:
    """Tiny random models; the prior with the original init (zero output head) unless for LoRA."""
    torch.manual_seed(0)
    prior = StableCascadeUNet(tiny.TINY_PRIOR)
    return Components(
        prior=init_unet(prior) if fresh_prior else prior,
        decoder=init_unet(StableCascadeUNet(tiny.TINY_DECODER)),
        stage_a=init_stage_a(PaellaVQModel(tiny.TINY_VQGAN)),
        effnet=EfficientNetEncoder(TINY_EFFNET),
        tokenizer=tiny.tokenizer(tmp / "tokenizer"),
        text_encoder=tiny.text_encoder(),
        image_encoder=tiny.image_encoder(),
        feature_extractor=tiny.feature_extractor(),
        previewer=Previewer(TINY_PREVIEWER),
    )


def config(task: str, data: Path, output: Path, **changes: object) -> TrainConfig:
    side, lr = SETTINGS[task]
    values: dict[str, object] = {
        "resolution": side,
        "batch_size": 2,
        "lr": lr,
        "ema_decay": 0.0,
        "checkpoint_every": 1000,
        "log_every": 1000,
    }
    return TrainConfig(task=task, data=data, output_dir=output, **{**values, **changes})  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; two spin-wait badly when the CPUs are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_images(folder, [(96, 96), (80, 112)])
    return folder


# -- data -------------------------------------------------------------------------------------------


def test_folder_manifest_and_tar_give_the_same_examples(tmp_path: Path) -> None:
    texts = write_images(tmp_path / "folder", [(40, 48), (32, 32), (48, 40)])
    (tmp_path / "images").mkdir()
    lines = []
    for index, text in enumerate(texts):
        name = f"{index:03d}.png"
        (tmp_path / "images" / name).write_bytes((tmp_path / "folder" / name).read_bytes())
        lines.append(json.dumps({"file_name": f"images/{name}", "text": text}))
    (tmp_path / "train.jsonl").write_text("\n".join(lines) + "\n")
    (tmp_path / "shards").mkdir()
    with tarfile.open(tmp_path / "shards" / "000.tar", "w") as tar:
        for index, text in enumerate(texts):
            tar.add(tmp_path / "folder" / f"{index:03d}.png", arcname=f"sample{index}.png")
            info = tarfile.TarInfo(f"sample{index}.txt")
            info.size = len(text.encode())
            tar.addfile(info, io.BytesIO(text.encode()))
    sources = [
        tmp_path / "folder",
        tmp_path / "train.jsonl",
        tmp_path / "shards",
        tmp_path / "shards" / "000.tar",
    ]
    for source in sources:
        examples = find_examples(source)
        assert [e.caption for e in examples] == texts, source
        assert [e.image.size() for e in examples] == [(40, 48), (32, 32), (48, 40)], source
        pixels = [np.asarray(e.image.read()) for e in examples]
        expected = [np.asarray(PIL.Image.open(tmp_path / "folder" / f"{i:03d}.png")) for i in range(3)]
        assert all(np.array_equal(a, b) for a, b in zip(pixels, expected, strict=True)), source


def test_data_mistakes_are_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_examples(tmp_path / "missing")
    write_images(tmp_path / "uncaptioned", [(32, 32), (32, 32)], captions=False)
    with pytest.raises(ValueError, match=r"2 of 2 images .* have no caption file"):
        find_examples(tmp_path / "uncaptioned")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="found no images"):
        find_examples(tmp_path / "empty")
    (tmp_path / "bad.jsonl").write_text('{"file_name": "x.png"}\n')
    with pytest.raises(ValueError, match='needs a "text" string'):
        find_examples(tmp_path / "bad.jsonl")


def test_buckets_group_images_by_aspect_ratio(tmp_path: Path) -> None:
    sizes = bucket_sizes(256, [1.0, 0.5, 2.0], multiple=32)
    assert sizes == [(256, 256), (352, 160), (160, 352)]  # (h, w): area ≈ 256², multiples of 32
    texts = write_images(tmp_path, [(100, 100), (60, 130), (130, 60), (90, 100), (64, 128)])
    examples = find_examples(tmp_path)
    assert len(examples) == len(texts)
    assert group_by_bucket(examples, sizes) == [[0, 3], [2], [1, 4]]
    dataset, groups = bucketed_dataset(examples, 256, [1.0, 0.5, 2.0], 32)
    sampler = BucketBatchSampler(groups, batch_size=2, seed=0)
    for batch in sampler.epoch(0):  # every batch from one bucket: its images stack
        assert {dataset.sizes[i] for i in batch} == {dataset.sizes[batch[0]]}
        assert collate([dataset[i] for i in batch]).images.shape[-2:] == dataset.sizes[batch[0]]


def test_sampler_resumes_and_splits_between_processes() -> None:
    groups = [list(range(7)), list(range(7, 12))]
    stream = iter(BucketBatchSampler(groups, batch_size=2, seed=3))
    first = [next(stream) for _ in range(20)]
    resumed = iter(BucketBatchSampler(groups, batch_size=2, seed=3, start=13))
    assert [next(resumed) for _ in range(7)] == first[13:]
    assert BucketBatchSampler(groups, 2, seed=4).epoch(0) != BucketBatchSampler(groups, 2, seed=3).epoch(0)
    ranks = [BucketBatchSampler(groups, 2, seed=3, rank=r, world_size=2).epoch(0) for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 4  # 7 batches, padded to 8, shared
    assert {i for b in ranks[0] + ranks[1] for i in b} == set(range(12))


def test_caption_dropout_rate() -> None:
    generator = torch.Generator().manual_seed(0)
    captions = drop_captions(["a cat"] * 20000, 0.05, generator)
    assert Counter(captions)[""] / len(captions) == pytest.approx(0.05, abs=0.006)
    assert set(drop_captions(["a", "b"], 0.0, generator)) == {"a", "b"}


# -- objective --------------------------------------------------------------------------------------


def test_noising_follows_the_cosine_schedule() -> None:
    x0 = torch.randn(4096, 1, 1, 1)
    noised = diffuse(x0, torch.Generator().manual_seed(0))
    signal = noised.logsnr.sigmoid().view(-1, 1, 1, 1)
    expected = signal.sqrt() * x0 + (1 - signal).sqrt() * noised.noise
    torch.testing.assert_close(noised.sample, expected)
    torch.testing.assert_close(noised.r, noise_cond(noised.logsnr))
    # t ~ U(0, 1) and the UNet's r inverts the schedule: r is uniform too.
    assert noised.r.mean().item() == pytest.approx(0.5, abs=0.02)
    weights = LossWeights("p2")(torch.tensor([-10.0, 0.0, 10.0]))
    torch.testing.assert_close(weights, 1 / (1 + torch.tensor([-10.0, 0.0, 10.0]).exp()))


def test_adaptive_weights_normalise_the_loss_per_noise_level() -> None:
    weights = LossWeights("adaptive")
    logsnr = torch.tensor([-5.0, 5.0])
    for _ in range(2000):
        weights.update(logsnr, torch.tensor([4.0, 0.25]))
    torch.testing.assert_close(weights(logsnr), torch.tensor([0.25, 4.0]), rtol=1e-3, atol=0)


# -- models -----------------------------------------------------------------------------------------


def test_components_from_pieces_pipelines_and_configs(data: Path, tmp_path: Path) -> None:
    parts = components(tmp_path)
    assert parts.prior is not None and parts.effnet is not None
    parts.prior.save_pretrained(tmp_path / "prior")
    StableCascadePriorPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        prior=parts.prior,
        scheduler=DDPMWuerstchenScheduler(),
    ).save_pretrained(tmp_path / "pipeline")
    (tmp_path / "effnet.json").write_text(json.dumps(TINY_EFFNET.to_dict()))
    run = TrainConfig(
        task="stage-c",
        data=data,
        output_dir=tmp_path,
        prior=tmp_path / "prior",
        effnet=tmp_path / "effnet.json",
        text_encoder=tmp_path / "pipeline",
    )
    found = load_components(run)
    assert found.prior is not None and found.effnet is not None and found.text_encoder is not None
    assert all(
        torch.equal(a, b) for a, b in zip(found.prior.parameters(), parts.prior.parameters(), strict=True)
    )
    assert found.effnet.config == TINY_EFFNET
    assert found.tokenizer("a cat").input_ids == parts.tokenizer("a cat").input_ids
    fresh = load_components(
        run.replace(prior=None, init_config="tiny_prior", pretrained=tmp_path / "pipeline")
    )
    assert fresh.prior is not None and fresh.prior.config == tiny.TINY_PRIOR
    assert not torch.any(fresh.prior.clf[1].weight)  # the original init: a zero output head
    with pytest.raises(ValueError, match="does not describe a Stage B"):
        load_components(run.replace(task="stage-b", init_config="tiny_prior"))


# -- training ---------------------------------------------------------------------------------------


def fixed_loss(task: Task, batch: Batch, draws: int = 16) -> float:
    """The task's mean loss on one batch over ``draws`` fixed noise draws, dropout off."""
    generator = torch.Generator().manual_seed(7)
    task.trainee.eval()
    with torch.no_grad():
        losses = [task.trainee(**task.prepare(batch, generator))["loss"].mean() for _ in range(draws)]
    task.trainee.train()
    return float(torch.stack(losses).mean())


@pytest.mark.parametrize("name", ["stage-c", "stage-b", "stage-a", "lora", "previewer"])
def test_a_few_steps_lower_the_loss(name: str, data: Path, tmp_path: Path) -> None:
    extra = (
        {"train_effnet": True, "train_text_encoder": True}
        if name == "stage-b"
        else {"train_text_encoder": True}
        if name == "stage-c"
        else {}
    )
    run = config(name, data, tmp_path / "run", steps=30, sample_every=30, **extra)
    task = make_task(run, components(tmp_path, fresh_prior=name != "lora"))
    dataset, groups = bucketed_dataset(find_examples(data), run.resolution, (1.0,), task.size_multiple)
    batch = collate([dataset[i] for i in groups[0]])  # the two images: every step's batch
    before = fixed_loss(task, batch)
    text_before = task.parts.text_encoder.text_projection.weight.detach().clone()
    final = train(run, task=task)
    after = fixed_loss(task, batch)
    assert after < 0.9 * before, (before, after)
    if name == "stage-b":  # the jointly trained text encoder is exported with its new weights
        exported_text = StableCascadeDecoderPipeline.from_pretrained(final).text_encoder
        assert not torch.equal(exported_text.text_projection.weight, text_before)
    exported = {p.name for p in final.iterdir()}
    expected = {"stage-a": {"config.json"}, "lora": {"lora.safetensors"}, "previewer": {"config.json"}}.get(
        name, {"model_index.json"}
    )
    assert expected <= exported
    assert PIL.Image.open(tmp_path / "run" / "samples" / "step-000030.png").size[0] > 0


def test_exports_load_as_pipelines(data: Path, tmp_path: Path) -> None:
    run = config("stage-c", data, tmp_path / "run", steps=1, ema_decay=0.9)
    parts = components(tmp_path)
    final = train(run, parts)
    pipe = StableCascadePriorPipeline.from_pretrained(final)
    assert pipe.effnet is not None and pipe.image_encoder is not None
    out = pipe("a rectangle", height=64, width=64, num_inference_steps=2, output_type="pt")
    assert out.image_embeddings.shape == (1, 16, 2, 2)


def test_stage_c_inputs(data: Path, tmp_path: Path) -> None:
    """Target latents at the prior pipeline's size; CLIP image embeddings for the chosen share."""
    parts = components(tmp_path)
    dataset, groups = bucketed_dataset(find_examples(data), 128, (1.0,), 32)
    batch = collate([dataset[i] for i in groups[0]])
    for share in (0.0, 1.0):
        task = make_task(config("stage-c", data, tmp_path, image_conditioning=share), parts)
        inputs = task.prepare(batch, torch.Generator().manual_seed(0))
        assert inputs["sample"].shape == (2, 16, 3, 3)  # ⌈128 / 42.67⌉
        assert inputs["clip_text"].shape == (2, 77, tiny.TEXT_WIDTH)
        assert inputs["clip_img"].shape == (2, 1, tiny.IMAGE_WIDTH)
        assert bool(inputs["clip_img"].abs().sum(dim=(1, 2)).gt(0).all()) == (share == 1.0)


def prompted_manifest(data: Path, folder: Path) -> Path:
    """The two images of ``data`` in a manifest where the first names the second as its image prompt."""
    first, second = sorted(data.glob("*.png"))
    manifest = folder / "metadata.jsonl"
    lines = [
        {"file_name": str(first), "text": "a rectangle", "image_prompt": str(second)},
        {"file_name": str(second), "text": ""},
    ]
    manifest.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    return manifest


def test_stage_c_reads_the_image_prompts_a_manifest_names(data: Path, tmp_path: Path) -> None:
    """An example naming an image prompt always gets that image's embedding, the others as before (the
    share): here none, so the second image's embedding is the first sample's and the second gets zeros."""
    parts = components(tmp_path)
    manifest = prompted_manifest(data, tmp_path)
    examples = find_examples(manifest)
    assert examples[0].prompt is not None and examples[0].prompt.path == examples[1].image.path
    assert examples[1].prompt is None
    dataset, groups = bucketed_dataset(examples, 96, (1.0,), 32)
    batch = collate([dataset[i] for i in sorted(groups[0])])
    assert batch.prompted.tolist() == [True, False]
    assert torch.equal(batch.prompts[0], batch.images[1])
    task = make_task(config("stage-c", manifest, tmp_path, image_conditioning=0.0), parts)
    embeddings = task.prepare(batch, torch.Generator().manual_seed(0))["clip_img"]
    pixels = parts.feature_extractor(list(batch.images[1:]), do_rescale=False, return_tensors="pt")
    with torch.no_grad():
        expected = parts.image_encoder(pixels.pixel_values).image_embeds
    torch.testing.assert_close(embeddings[0], expected)
    assert not embeddings[1].any()


def test_stage_b_noise_and_effnet_scale(data: Path, tmp_path: Path) -> None:
    """Pyramid noise has coarse (here: whole-image) structure, plain Gaussian noise has not; the effnet
    input is resized by a factor drawn from ``effnet_scale`` (to a multiple of 32)."""
    parts = components(tmp_path)
    dataset, groups = bucketed_dataset(find_examples(data), 128, (1.0,), 32)
    batch = collate([dataset[i] for i in groups[0]])
    offsets, sizes = {}, set()
    for side in (16, 0):
        run = config("stage-b", data, tmp_path, pyramid_noise_max_side=side, train_effnet=True)
        task = make_task(run, parts)
        for seed in range(4):
            inputs = task.prepare(batch, torch.Generator().manual_seed(seed))
            sizes.add(inputs["effnet_images"].shape[-1])
        offsets[side] = float(inputs["noise"].mean(dim=(2, 3)).abs().max())  # per sample and channel
    assert offsets[0] < 0.15 < offsets[16], offsets
    assert sizes == {64, 96}, sizes  # factor < 1: never the full 128
    run = config("stage-b", data, tmp_path, effnet_scale=(0.75, 0.75), train_effnet=True)
    task = make_task(run, parts)
    assert task.prepare(batch, torch.Generator().manual_seed(0))["effnet_images"].shape[-1] == 96


def test_bf16_autocast_and_gradient_checkpointing(data: Path, tmp_path: Path) -> None:
    run = config("stage-c", data, tmp_path, steps=2, mixed_precision="bf16", gradient_checkpointing=True)
    task = make_task(run.replace(train_text_encoder=True), components(tmp_path))
    train(run.replace(train_text_encoder=True), task=task)
    assert task.trainee.unet.gradient_checkpointing  # type: ignore[union-attr]
    assert any(getattr(m, "gradient_checkpointing", False) for m in task.parts.text_encoder.modules())  # type: ignore[union-attr]
    weights = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in weights.values())


def test_resume_continues_bit_identically(data: Path, tmp_path: Path) -> None:
    """Stage B with the EfficientNet encoder, adaptive weights, EMA and dropout: all state resumes."""
    options = {"train_effnet": True, "loss_weighting": "adaptive", "ema_decay": 0.9, "checkpoint_every": 2}
    train(config("stage-b", data, tmp_path / "straight", steps=4, **options), components(tmp_path))
    train(config("stage-b", data, tmp_path / "resumed", steps=2, **options), components(tmp_path))
    resumed = config("stage-b", data, tmp_path / "resumed", steps=4, resume="latest", **options)
    train(resumed, components(tmp_path))
    for name in ("model", "ema", "state"):
        straight = load_file(tmp_path / "straight" / "checkpoint-4" / f"{name}.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoint-4" / f"{name}.safetensors")
        assert straight.keys() == again.keys()
        assert all(torch.equal(straight[k], again[k]) for k in straight), name
    early = load_file(tmp_path / "straight" / "checkpoint-2" / "model.safetensors")
    late = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    assert not all(torch.equal(early[k], late[k]) for k in early)  # it did train in between
    files = {p.name for p in (tmp_path / "resumed" / "checkpoint-4").iterdir()}
    assert files == {
        "model.safetensors",
        "ema.safetensors",
        "state.safetensors",
        "rng-0.safetensors",
        "trainer_state.json",
    }


def test_option_mistakes_are_clear(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"--train-effnet .* only works with stage-b"):
        TrainConfig(task="stage-c", data=data, output_dir=tmp_path, train_effnet=True)
    with pytest.raises(ValueError, match=r"--train-text-encoder .* only works with stage-c / stage-b"):
        TrainConfig(task="stage-a", data=data, output_dir=tmp_path, train_text_encoder=True)
    with pytest.raises(ValueError, match=r"effnet_scale is a range \(low, high\)"):
        TrainConfig(task="stage-b", data=data, output_dir=tmp_path, effnet_scale=(0.9, 0.5))
    with pytest.raises(ValueError, match="pyramid_noise_max_side must be >= 0"):
        TrainConfig(task="stage-b", data=data, output_dir=tmp_path, pyramid_noise_max_side=-1)
    with pytest.raises(ValueError, match="task must be one of"):
        TrainConfig(task="stage-d", data=data, output_dir=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError, match=r"stage-c needs prior, effnet, tokenizer, text_encoder \(not given\)"
    ):
        make_task(TrainConfig(task="stage-c", data=data, output_dir=tmp_path), Components())
    parts = components(tmp_path)
    parts.effnet = EfficientNetEncoder(TINY_EFFNET.replace(c_latent=8))
    with pytest.raises(ValueError, match="in_channels is 16 but the EfficientNet latent has 8"):
        make_task(TrainConfig(task="stage-c", data=data, output_dir=tmp_path), parts)
    with pytest.raises(ValueError, match=r"latest: .* has no checkpoint"):
        train(config("stage-a", data, tmp_path, resume="latest", init_config="tiny_vqgan"))


# -- command line -----------------------------------------------------------------------------------


def test_cli_help_and_usage_errors(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    assert "--loss-weighting {p2,adaptive,none}" in capsys.readouterr().out
    assert main(["train", "stage-c", "--data", str(tmp_path / "nothing"), "-o", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    arguments = ["train", "stage-c", "--data", str(data), "--train-effnet", "-o", str(tmp_path)]
    assert main(arguments) == 2
    assert "only works with stage-b" in capsys.readouterr().err
    from stable_cascade.cli.main import build_parser
    from stable_cascade.cli.train import config_from_args

    options = ["train", "stage-c", "--data", str(data), "--image-conditioning", "0.5"]
    assert config_from_args(build_parser().parse_args(options)).image_conditioning == 0.5


def test_cli_trains_stage_a_end_to_end(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    arguments = ["--init-config", "tiny_vqgan", "--resolution", "32", "--steps", "2", "--batch-size", "2"]
    more = ["--sample-every", "2", "--checkpoint-every", "1", "--buckets", "1/1,2/3", "-o", str(out)]
    assert main(["train", "stage-a", "--data", str(data), *arguments, *more]) == 0
    assert f"trained stage-a: {out / 'final'}" in capsys.readouterr().out
    assert PaellaVQModel.from_pretrained(out / "final").config == tiny.TINY_VQGAN
    assert (out / "samples" / "step-000002.png").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    saved = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    assert saved["step"] == 2 and saved["config"]["buckets"] == [1.0, 2 / 3]


#: Run by each process: the command line's arguments → config → training, then a weights checksum
#: (of the full weights: under FSDP each process holds a shard).
WORKER = """
import os, sys
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule
from stable_cascade.cli.main import build_parser
from stable_cascade.cli.train import config_from_args
from stable_cascade.training import load_components, make_task, train

torch.set_num_threads(1)
config = config_from_args(build_parser().parse_args(sys.argv[1:]))
task = make_task(config, load_components(config))
train(config, task=task)
full = get_model_state_dict(task.trainee, options=StateDictOptions(full_state_dict=True))
checksum = repr(sum(float(t.double().sum()) for t in full.values()))
ends = config.output_dir / f"end-{os.environ['RANK']}.txt"  # a file: two processes share one stdout
ends.write_text(f"{checksum} {isinstance(task.trainee, FSDPModule)}")
"""
#: What ``accelerate launch --use_fsdp --fsdp_version 2 --fsdp_auto_wrap_policy TRANSFORMER_BASED_WRAP
#: --fsdp_transformer_layer_cls_to_wrap ResBlock,TimestepBlock,AttnBlock`` sets.
FSDP = {
    "ACCELERATE_USE_FSDP": "true",
    "FSDP_VERSION": "2",
    "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
    "FSDP_TRANSFORMER_CLS_TO_WRAP": "ResBlock,TimestepBlock,AttnBlock",
}


@pytest.fixture(scope="module")
def launcher(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Launcher:
    folder = tmp_path_factory.mktemp("two_processes")
    parts = components(folder)
    prior = StableCascadePriorPipeline(
        tokenizer=parts.tokenizer,
        text_encoder=parts.text_encoder,
        prior=parts.prior,
        scheduler=DDPMWuerstchenScheduler(),
        effnet=parts.effnet,
    )
    prior.save_pretrained(folder / "pipeline")
    (folder / "worker.py").write_text(WORKER)
    return Launcher(folder, data, parts.prior.state_dict())  # type: ignore[union-attr]


class Launcher:
    """Stage C + its text encoder, 3 steps of batch 1 per process, on two CPU processes (gloo)."""

    def __init__(self, folder: Path, data: Path, initial: dict[str, torch.Tensor]) -> None:
        self.folder, self.data, self.initial = folder, data, initial
        self.runs: dict[str, Path] = {}

    def __call__(
        self, name: str, env: dict[str, str], *options: str, fails: str | None = None, task: str = "stage-c"
    ) -> dict[str, tuple[str, ...]]:
        """Train into ``folder/name``; per process, the checksum of the weights it ends with and
        whether it trained a sharded model. ``fails``: the run must fail with this message instead."""
        out = self.folder / name
        # --standalone: the rendezvous picks a free port itself (no race with other processes)
        launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        launch += [str(self.folder / "worker.py"), "train", task]
        launch += ["--data", str(self.data), "--pretrained", str(self.folder / "pipeline")]
        launch += ["--resolution", "64", "--batch-size", "1", "--steps", "3", "--lr", "1e-3"]
        launch += ["--train-text-encoder"] if task == "stage-c" else []
        launch += ["--checkpoint-every", "2", "-o", str(out), *options]
        cpu = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env = {**os.environ, **cpu, **env}
        done = subprocess.run(launch, capture_output=True, text=True, env=env, timeout=240, check=False)
        if fails is not None:
            assert done.returncode != 0 and fails in done.stderr, done.stderr[-3000:]
            return {}
        assert done.returncode == 0, done.stderr[-3000:]
        self.runs[name] = out
        return {p.stem.removeprefix("end-"): tuple(p.read_text().split()) for p in out.glob("end-*.txt")}

    def weights(self, name: str, step: int, file: str = "model") -> dict[str, torch.Tensor]:
        return load_file(self.runs[name] / f"checkpoint-{step}" / f"{file}.safetensors")


@pytest.mark.slow
def test_two_processes_train_as_one(launcher: Launcher) -> None:
    """DDP on two CPU processes (gloo): each trains on its share, both end with the same weights."""
    ends = launcher("ddp", {})
    assert ends.keys() == {"0", "1"} and ends["0"] == ends["1"] == (ends["0"][0], "False"), ends
    out = launcher.runs["ddp"]
    saved = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert saved["world_size"] == 2
    rng = {p.name for p in (out / "checkpoint-3").glob("rng-*")}
    assert rng == {"rng-0.safetensors", "rng-1.safetensors"}  # each process's random state
    trained = launcher.weights("ddp", 3)
    assert not all(
        torch.equal(v, launcher.initial[k.removeprefix("unet.")])
        for k, v in trained.items()
        if k.startswith("unet.")
    )
    assert StableCascadePriorPipeline.from_pretrained(out / "final").prior.config == tiny.TINY_PRIOR


@pytest.mark.slow
def test_controlnet_trains_on_two_processes(launcher: Launcher) -> None:
    """``train controlnet`` under DDP: both processes end with the same ControlNet, the prior frozen."""
    ends = launcher("controlnet", {}, task="controlnet")
    assert ends.keys() == {"0", "1"} and ends["0"] == ends["1"], ends
    trained = launcher.weights("controlnet", 3)
    assert trained and all(k.startswith("controlnet.") for k in trained)
    assert ControlNet.from_pretrained(launcher.runs["controlnet"] / "final").config.control_type == "canny"


# An attention key bias adds the same q·b to all logits of a query, which softmax ignores: its gradient
# is zero up to rounding, and Adam turns that float noise into updates (|values| < 4e-6 after 3 steps).
# FSDP and DDP sum gradients in different orders, so these biases differ by up to 1.3e-6 (measured on
# an AMD CPU); every other weight agrees within rtol 1e-4, atol 1e-6. A real update (lr 1e-3) would
# be 100x the 1e-5 allowed for them.
KEY_BIASES = ("to_k.bias", "k_proj.bias")


@pytest.mark.slow
def test_fsdp_on_two_processes_trains_as_ddp_and_resumes_exactly(launcher: Launcher) -> None:
    """FSDP (torch's fully_shard, the blocks wrapped as accelerate's launcher asks) on two CPU
    processes: the same weights and EMA as DDP, full checkpoints, and an exact resume."""
    if "ddp" not in launcher.runs:
        launcher("ddp", {})
    ends = launcher("fsdp", FSDP)
    assert ends.keys() == {"0", "1"} and ends["0"] == ends["1"] == (ends["0"][0], "True"), ends
    for file in ("model", "ema"):
        sharded, replicated = launcher.weights("fsdp", 3, file), launcher.weights("ddp", 3, file)
        assert sharded.keys() == replicated.keys()
        for key, value in sharded.items():
            atol = 1e-5 if key.endswith(KEY_BIASES) else 1e-6
            torch.testing.assert_close(value, replicated[key], rtol=1e-4, atol=atol, msg=key)
    launcher("fsdp_resumed", FSDP, "--resume", str(launcher.runs["fsdp"] / "checkpoint-2"))
    for file in ("model", "ema"):
        resumed, straight = launcher.weights("fsdp_resumed", 3, file), launcher.weights("fsdp", 3, file)
        assert all(torch.equal(resumed[key], value) for key, value in straight.items())
    final = launcher.runs["fsdp"] / "final"
    assert StableCascadePriorPipeline.from_pretrained(final).prior.config == tiny.TINY_PRIOR
    launcher("fsdp1", {**FSDP, "FSDP_VERSION": "1"}, fails="launch with --fsdp_version 2")


def test_missing_accelerate_says_which_extra_to_install(
    data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import accelerate → ImportError
    with pytest.raises(OSError, match=r"stable-cascade\[train\]"):
        train(config("stage-a", data, tmp_path / "run", steps=1))
