"""The ``previewer`` training task: EfficientNet latents of the images in, the images at 8× the
latent's size out; its inputs, export, exact resume, command line and mistakes (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import (  # one_thread: its autouse fixture (one thread for tiny models)
    TINY_EFFNET,
    TINY_PREVIEWER,
    one_thread,  # noqa: F401
    write_images,
)

from stable_cascade.cli.main import main
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.previewer import Previewer
from stable_cascade.training import Components, TrainConfig, fresh_model, make_task, train
from stable_cascade.training.data import bucketed_dataset, collate, find_examples


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("data")
    write_images(folder, [(128, 128), (128, 128), (96, 128)])
    return folder


def parts() -> Components:
    torch.manual_seed(0)
    return Components(effnet=EfficientNetEncoder(TINY_EFFNET), previewer=Previewer(TINY_PREVIEWER))


def run(data: Path, output: Path, **changes: object) -> TrainConfig:
    values: dict[str, object] = {"resolution": 128, "batch_size": 2, "lr": 3e-3, "log_every": 100}
    return TrainConfig(task="previewer", data=data, output_dir=output, **{**values, **changes})  # type: ignore[arg-type]


def test_inputs_are_the_effnet_latent_and_the_image_at_the_preview_size(data: Path, tmp_path: Path) -> None:
    task = make_task(run(data, tmp_path), parts())
    dataset, groups = bucketed_dataset(find_examples(data), 128, (1.0,), task.size_multiple)
    batch = collate([dataset[i] for i in groups[0][:2]])
    inputs = task.prepare(batch, torch.Generator().manual_seed(0))
    assert inputs.keys() == {"latents", "target"}
    effnet = task.parts.effnet
    assert effnet is not None and not any(p.requires_grad for p in effnet.parameters())
    expected = effnet.encode(prepare_images(batch.images, 96, 96))  # the prior pipeline's effnet size
    assert inputs["latents"].shape == (2, 16, 3, 3) and torch.equal(inputs["latents"], expected)
    assert torch.equal(inputs["target"], prepare_images(batch.images, 24, 24))  # 8 × the latent


def test_export_loads_as_a_model_folder_and_as_a_single_file(data: Path, tmp_path: Path) -> None:
    final = train(run(data, tmp_path / "run", steps=3, ema_decay=0.9), parts())
    loaded = Previewer.from_pretrained(final)
    assert loaded.config == TINY_PREVIEWER
    single = Previewer.from_single_file(final / "diffusion_pytorch_model.safetensors")  # --previewer FILE
    latents = torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loaded.preview(latents), single.preview(latents))
    ema = load_file(tmp_path / "run" / "checkpoint-3" / "ema.safetensors")
    exported = load_file(final / "diffusion_pytorch_model.safetensors")
    assert torch.equal(exported["blocks.0.weight"], ema["previewer.blocks.0.weight"])  # the EMA ships
    assert torch.equal(exported["blocks.2.running_mean"], ema["previewer.blocks.2.running_mean"])


def test_resume_continues_bit_identically(data: Path, tmp_path: Path) -> None:
    """BatchNorm statistics (and their EMA) are part of the state."""
    options = {"ema_decay": 0.9, "checkpoint_every": 2}
    train(run(data, tmp_path / "straight", steps=4, **options), parts())
    train(run(data, tmp_path / "resumed", steps=2, **options), parts())
    train(run(data, tmp_path / "resumed", steps=4, resume="latest", **options), parts())
    for name in ("model", "ema", "state"):
        straight = load_file(tmp_path / "straight" / "checkpoint-4" / f"{name}.safetensors")
        again = load_file(tmp_path / "resumed" / "checkpoint-4" / f"{name}.safetensors")
        assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
    model = load_file(tmp_path / "straight" / "checkpoint-4" / "model.safetensors")
    assert "previewer.blocks.2.running_var" in model and "previewer.blocks.2.num_batches_tracked" in model


def test_cli_trains_a_fresh_previewer_on_a_saved_encoder(
    data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parts().effnet.save_pretrained(tmp_path / "effnet")  # type: ignore[union-attr]
    (tmp_path / "previewer.json").write_text(json.dumps(TINY_PREVIEWER.to_dict()))
    out = tmp_path / "run"
    arguments = ["--effnet", str(tmp_path / "effnet"), "--init-config", str(tmp_path / "previewer.json")]
    more = ["--resolution", "128", "--steps", "2", "--batch-size", "2", "--sample-every", "2", "-o", str(out)]
    assert main(["train", "previewer", "--data", str(data), *arguments, *more]) == 0
    assert f"trained previewer: {out / 'final'}" in capsys.readouterr().out
    assert Previewer.from_pretrained(out / "final").config == TINY_PREVIEWER
    assert (out / "samples" / "step-000002.png").is_file()
    # Fine-tuning the result: --previewer takes the exported folder.
    again = ["--effnet", str(tmp_path / "effnet"), "--previewer", str(out / "final"), "--steps", "1"]
    assert main(["train", "previewer", "--data", str(data), *again, "-o", str(tmp_path / "again")]) == 0


def test_mistakes_are_clear(data: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"previewer needs effnet, previewer \(not given\); pass --effnet"):
        make_task(run(data, tmp_path), Components())
    mismatched = parts()
    mismatched.previewer = Previewer(TINY_PREVIEWER.replace(c_in=8))
    with pytest.raises(ValueError, match="previewer's c_in is 8 but the EfficientNet latent has 16"):
        make_task(run(data, tmp_path), mismatched)
    with pytest.raises(ValueError, match="previewer has no noise levels"):
        run(data, tmp_path, loss_weighting="adaptive")
    with pytest.raises(ValueError, match=r"neither a variant \(previewer, demo_previewer\)"):
        fresh_model("previewer", "tiny_prior", seed=0)
