"""Training that goes wrong stops with one clear error and leaves no NaN checkpoint or ``final/`` behind;
broken state files are named; a NaN checkpoint is never resumed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny
from stable_cascade import PaellaVQModel
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.training import Components, TrainConfig, train
from stable_cascade.training.components import fresh_model, init_stage_a, load_components
from stable_cascade.training.data import find_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for index in range(2):
        PIL.Image.fromarray(rng.integers(0, 255, (32, 32, 3), np.uint8)).save(folder / f"{index}.png")
        (folder / f"{index}.txt").write_text(f"image {index}")
    return folder


def stage_a(poisoned: bool = False) -> Components:
    torch.manual_seed(0)
    model = init_stage_a(PaellaVQModel(tiny.TINY_VQGAN))
    if poisoned:
        with torch.no_grad():
            next(model.parameters()).fill_(float("nan"))
    return Components(stage_a=model)


def config(data: Path, output: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {"resolution": 32, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.0, "steps": 2}
    return TrainConfig(task="stage-a", data=data, output_dir=output, **{**values, **changes})  # type: ignore[arg-type]


def test_a_nan_loss_stops_the_run_and_publishes_nothing(data: Path, tmp_path: Path) -> None:
    with pytest.raises(
        FloatingPointError, match=r"^training diverged at step 1: the loss is nan, .*no final/"
    ) as e:
        train(config(data, tmp_path / "run", checkpoint_every=1), stage_a(poisoned=True))
    assert "\n" not in str(e.value) and "lower the learning rate" in str(e.value)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


def test_nan_weights_after_a_finite_loss_are_never_saved(data: Path, tmp_path: Path) -> None:
    parts = stage_a()
    weight = next(parts.stage_a.parameters())  # type: ignore[union-attr]
    weight.register_hook(lambda grad: torch.full_like(grad, float("nan")))  # a backward pass that blows up
    run = tmp_path / "run"
    with pytest.raises(FloatingPointError, match=r"step 1: the weights hold NaN/Inf .*then start again"):
        train(config(data, run, checkpoint_every=1, grad_clip=0.0), parts)
    assert sorted(p.name for p in run.iterdir()) == []  # neither checkpoint-1, its .partial, nor final


def test_resuming_from_a_nan_checkpoint_is_refused(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, steps=1, checkpoint_every=1), stage_a())
    weights = run / "checkpoint-1" / "model.safetensors"
    tensors = load_file(weights)
    name = sorted(tensors)[0]
    tensors[name] = torch.full_like(tensors[name], float("inf"))
    save_file(tensors, weights, metadata={"format": "pt"})
    shutil.rmtree(run / "final")
    with pytest.raises(
        CheckpointError, match=r"model.safetensors holds NaN/Inf in 1 tensor.*earlier checkpoint"
    ):
        train(config(data, run, steps=2, resume="latest"), stage_a())
    assert not (run / "final").exists()


def test_broken_state_and_config_files_are_named(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(config(data, run, steps=1, checkpoint_every=1), stage_a())
    (run / "checkpoint-1" / "trainer_state.json").write_text('{"step": 1,')
    with pytest.raises(CheckpointError, match=r"checkpoint-1/trainer_state.json is not valid JSON"):
        train(config(data, run, steps=2, resume="latest"), stage_a())
    init = tmp_path / "init.json"
    init.write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"init.json is nested too deeply"):
        fresh_model("stage-a", str(init), 0)
    init.write_text('{"embed_dim": -4}')
    with pytest.raises(ValueError, match=r"init.json: VQConfig.embed_dim must be at least 1"):
        fresh_model("stage-a", str(init), 0)
    manifest = tmp_path / "metadata.jsonl"
    manifest.write_text(json.dumps({"file_name": str(data / "0.png"), "text": "x"}) + '\n{"file_name": \n')
    with pytest.raises(CheckpointError, match=r"metadata.jsonl:2 is not valid JSON"):
        find_examples(manifest)
    image = data / "0.png"
    manifest.write_text(json.dumps({"file_name": str(image), "text": "x", "image_prompt": "gone.png"}))
    with pytest.raises(FileNotFoundError, match=r"metadata.jsonl:1 names .*gone.png, which does not exist"):
        find_examples(manifest)
    manifest.write_text(json.dumps({"file_name": str(image), "text": "x", "image_prompt": 3}))
    with pytest.raises(ValueError, match=r'metadata.jsonl:1: "image_prompt" must be a string'):
        find_examples(manifest)
    manifest.write_bytes(b'{"file_name": "0.png", "text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl is not UTF-8 text"):
        find_examples(manifest)


def test_unreadable_training_images_are_named(tmp_path: Path) -> None:
    (tmp_path / "0.png").write_bytes(b"\x89PNG but not really")
    (tmp_path / "0.txt").write_text("a caption")
    (example,) = find_examples(tmp_path)
    with pytest.raises(ValueError, match=r"0.png is not an image file"):
        example.image.size()


def test_a_pickle_text_encoder_folder_is_refused_for_training(data: Path, tmp_path: Path) -> None:
    folder = tmp_path / "clip"
    tiny.text_encoder().config.save_pretrained(folder)
    torch.save({}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_components(config(data, tmp_path / "out", text_encoder=folder))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": float("nan")}, "lr must be a finite number"),
        ({"grad_clip": float("inf")}, "grad_clip must be a finite number"),
        ({"resolution": 10**6}, "resolution must be a whole number from 1 to 16,384"),
        ({"batch_size": 0}, "batch_size must be a whole number from 1"),
    ],
)
def test_absurd_training_settings_are_refused(data: Path, change: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        config(data, data / "out", **change)


# -- resume checks its state files -------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of one step with its checkpoint (and an optimizer state: Adam's moments per parameter)."""
    run = tmp_path_factory.mktemp("resume") / "run"
    train(config(data, run, steps=1, checkpoint_every=1), stage_a())
    shutil.rmtree(run / "final")
    return run


def edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(path: Path, change: Any) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    tensors = load_file(path)
    name = sorted(k for k, v in tensors.items() if v.ndim > 1)[0]
    if change == "drop":  # a tensor missing
        del tensors[name]
    elif change == "add":  # a tensor the model does not have
        tensors["extra.weight"] = torch.zeros(2)
    else:
        tensors[name] = change(tensors[name])
    save_file(tensors, path, metadata=metadata)


RESUME_MISTAKES: list[tuple[str, Any, str]] = [
    ("trainer_state.json", {"step": "1"}, r"step must be a whole number from 0 to 1000000000000, got '1'"),
    ("trainer_state.json", {"step": -3}, r"step must be a whole number from 0"),
    ("trainer_state.json", {"step": True}, r"step must be a whole number"),
    ("trainer_state.json", {"step": 10**15}, r"got 1000000000000000"),
    ("trainer_state.json", {"world_size": 0}, r"world_size must be a whole number from 1"),
    ("trainer_state.json", {"scheduler": [1]}, r"scheduler must be a JSON object"),
    (
        "model.safetensors",
        lambda t: t.flatten()[:-1],
        r"model.safetensors|checkpoint-1 does not fit .* wrong \[",
    ),
    ("model.safetensors", lambda t: t.to(torch.int32), r"does not fit .* is torch.int32"),
    ("model.safetensors", "drop", r"does not fit the trained model \(missing \['[^']+'\], unexpected \[\]"),
    (
        "model.safetensors",
        "add",
        r"does not fit the trained model \(missing \[\], unexpected \['extra.weight'\]",
    ),
    (
        "state.safetensors",
        lambda t: t[..., :1].contiguous(),
        r"state.safetensors: the optimizer state of .* has shape",
    ),
    ("rng-0.safetensors", None, r"rng-0.safetensors is not a random state"),
]


@pytest.mark.parametrize(("file", "change", "message"), RESUME_MISTAKES)
def test_resume_checks_its_state_files_in_one_line(
    finished_run: Path, data: Path, tmp_path: Path, file: str, change: Any, message: str
) -> None:
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / "checkpoint-1" / file
    if isinstance(change, dict):
        edit_json(path, **change)
    elif change is not None:
        edit_tensors(path, change)
    else:
        save_file({"generator": torch.zeros(3), "torch": torch.zeros(3)}, path, metadata={"format": "pt"})
    with pytest.raises((ValueError, CheckpointError), match=message) as error:
        train(config(data, run, steps=2, resume="latest"), stage_a())
    assert "\n" not in str(error.value)
    assert not (run / "final").exists()
