"""``train controlnet``: a ControlNet trained on a frozen tiny Stage C; control inputs; exact resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import components, fixed_loss, one_thread, write_images  # noqa: F401  (one_thread: autouse)

from stable_cascade.cli.train import config_from_args
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.training import TrainConfig, make_task, train
from stable_cascade.training.data import bucketed_dataset, collate, find_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("controlnet_data")
    write_images(folder, [(96, 96), (80, 112)])
    return folder


def config(data: Path, output: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {
        "resolution": 128,
        "batch_size": 2,
        "lr": 3e-3,
        "ema_decay": 0.0,
        "checkpoint_every": 1000,
        "log_every": 1000,
        **changes,
    }
    return TrainConfig(task="controlnet", data=data, output_dir=output, **values)  # type: ignore[arg-type]


def test_a_few_steps_lower_the_loss_with_the_prior_frozen(data: Path, tmp_path: Path) -> None:
    run = config(data, tmp_path / "run", steps=40, sample_every=40, lr=1e-2)
    parts = components(tmp_path, fresh_prior=False)  # a random prior: its output depends on the input
    assert parts.prior is not None
    prior_before = {k: v.clone() for k, v in parts.prior.state_dict().items()}
    task = make_task(run, parts)
    dataset, groups = bucketed_dataset(find_examples(data), run.resolution, (1.0,), task.size_multiple)
    batch = collate([dataset[i] for i in groups[0]])
    before = fixed_loss(task, batch)
    final = train(run, task=task)
    after = fixed_loss(task, batch)
    assert after < 0.9 * before, (before, after)
    assert all(torch.equal(v, prior_before[k]) for k, v in parts.prior.state_dict().items())
    exported = ControlNet.from_pretrained(final)
    assert exported.config.control_type == "canny" and exported.config.in_channels == 1
    assert exported.config.proj_blocks == (0, 1, 2, 3)  # every ResBlock call of the tiny prior
    weights = load_file(tmp_path / "run" / "checkpoint-40" / "model.safetensors")
    assert weights and all(k.startswith("controlnet.") for k in weights)  # only the ControlNet trains
    assert (tmp_path / "run" / "samples" / "step-000040.png").is_file()


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        ("canny", (2, 1, 128, 128)),
        ("inpainting", (2, 4, 128, 128)),
        ("super_resolution", (2, 16, 4, 4)),
        ("simple", (2, 1, 4, 4)),
    ],
)
def test_control_inputs_of_each_type(kind: str, shape: tuple[int, ...], data: Path, tmp_path: Path) -> None:
    task = make_task(config(data, tmp_path, controlnet_type=kind), components(tmp_path, fresh_prior=False))
    dataset, groups = bucketed_dataset(find_examples(data), 128, (1.0,), 32)
    batch = collate([dataset[i] for i in groups[0]])
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    assert inputs["control"].shape == shape
    out = task.trainee(**inputs)
    assert out["loss"].shape == (2,) and torch.isfinite(out["loss"]).all()
    if kind == "inpainting":
        mask = inputs["control"][:, 3:]
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert torch.all(inputs["control"][:, :3][mask.expand(2, 3, 128, 128) > 0] == 1.0)


def test_resume_continues_bit_identically(data: Path, tmp_path: Path) -> None:
    options = {"ema_decay": 0.9, "checkpoint_every": 2, "controlnet_type": "inpainting"}
    train(config(data, tmp_path / "straight", steps=4, **options), components(tmp_path, fresh_prior=False))
    train(config(data, tmp_path / "resumed", steps=2, **options), components(tmp_path, fresh_prior=False))
    resumed = config(data, tmp_path / "resumed", steps=4, resume="latest", **options)
    train(resumed, components(tmp_path, fresh_prior=False))
    for name in ("model", "ema", "state"):
        straight = load_file(tmp_path / "straight" / "checkpoint-4" / f"{name}.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoint-4" / f"{name}.safetensors")
        assert straight.keys() == again.keys()
        assert all(torch.equal(straight[k], again[k]) for k in straight), name


def test_cli_options_and_mistakes(data: Path, tmp_path: Path) -> None:
    from stable_cascade.cli.main import build_parser

    args = build_parser().parse_args(
        [
            "train",
            "controlnet",
            "--data",
            str(data),
            "--controlnet-type",
            "simple",
            "--controlnet-blocks",
            "0",
            "2",
        ]
    )
    run = config_from_args(args)
    assert run.controlnet_type == "simple" and run.controlnet_blocks == (0, 2)
    with pytest.raises(ValueError, match="controlnet trains on a pretrained Stage C"):
        config(data, tmp_path, init_config="tiny_prior")
    with pytest.raises(ValueError, match="controlnet_type"):
        config(data, tmp_path, controlnet_type="depth")
