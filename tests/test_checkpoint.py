"""The checkpoint layer on a tiny model defined here: diffusers directory layout, errors, Hub cache.

Nothing is downloaded: every Hub test runs offline against a fake cache in ``tmp_path`` or a recording
stand-in for ``huggingface_hub.hf_hub_download``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
from pathlib import Path
from typing import Any, ClassVar

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import EntryNotFoundError
from torch import nn

from stable_cascade.checkpoint import (
    CheckpointError,
    PretrainedConfigMixin,
    PretrainedModel,
    read_state_dict,
)
from stable_cascade.specs import ConfigBase, UNetConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclasses.dataclass(frozen=True)
class TinyConfig(ConfigBase):
    diffusers_class_name: ClassVar[str] = "TinyDiffusersModel"

    in_channels: int = 3
    hidden: int = 16
    kernel_sizes: tuple[int, ...] = (3, 3)  # a tuple, written to JSON as a list


class TinyModel(PretrainedModel):
    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(config.in_channels, config.hidden, config.kernel_sizes, padding=1)
        self.norm = nn.BatchNorm2d(config.hidden)  # running stats + an int64 num_batches_tracked
        self.proj = nn.Linear(config.hidden, config.in_channels)


@dataclasses.dataclass(frozen=True)
class TinySchedulerConfig(ConfigBase):
    diffusers_class_name: ClassVar[str] = "TinyScheduler"

    steps: int = 10


class TinyScheduler(PretrainedConfigMixin):
    config_class = TinySchedulerConfig
    config_name = "scheduler_config.json"

    def __init__(self, config: TinySchedulerConfig) -> None:
        self.config = config


def tiny_model(config: TinyConfig | None = None, seed: int = 0) -> TinyModel:
    """A model whose every tensor, buffers included, differs from its initial value."""
    model = TinyModel(config or TinyConfig())
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
    model.norm.num_batches_tracked.fill_(7)
    return model


def assert_same_tensors(loaded: nn.Module, original: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    expected = original.state_dict()
    actual = loaded.state_dict()
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        want = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert actual[name].dtype == want.dtype, name
        assert actual[name].device.type == "cpu", name
        assert torch.equal(actual[name], want), name


def files_in(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; hub 2.4 reads ``constants.HF_HUB_OFFLINE`` at call time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def saved(tmp_path: Path) -> tuple[TinyModel, Path]:
    model = tiny_model()
    model.save_pretrained(tmp_path / "model")
    return model, tmp_path / "model"


# --- round trip -------------------------------------------------------------------------------------


def test_round_trip_restores_tensors_config_and_eval_mode(saved: tuple[TinyModel, Path]) -> None:
    model, folder = saved
    assert files_in(folder) == {"config.json", WEIGHTS}
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "TinyDiffusersModel"
    assert config["kernel_sizes"] == [3, 3]

    loaded = TinyModel.from_pretrained(folder)
    assert loaded.config == model.config
    assert not loaded.training
    assert loaded.dtype == torch.float32
    assert_same_tensors(loaded, model)


def test_weights_are_cast_to_float32_by_default(tmp_path: Path) -> None:
    model = tiny_model().to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    assert_same_tensors(TinyModel.from_pretrained(tmp_path), model, torch.float32)


@pytest.mark.parametrize(
    ("torch_dtype", "expected"),
    [
        (torch.bfloat16, torch.bfloat16),
        ("bf16", torch.bfloat16),
        ("torch.float16", torch.float16),
        ("fp32", torch.float32),
    ],
)
def test_torch_dtype_casts_floating_tensors_only(
    saved: tuple[TinyModel, Path], torch_dtype: torch.dtype | str, expected: torch.dtype
) -> None:
    model, folder = saved
    loaded = TinyModel.from_pretrained(folder, torch_dtype=torch_dtype)
    assert loaded.dtype == expected
    assert_same_tensors(loaded, model, expected)  # num_batches_tracked stays int64


@pytest.mark.parametrize(("torch_dtype", "error"), [(torch.int8, TypeError), ("float8", ValueError)])
def test_invalid_torch_dtype_raises(
    saved: tuple[TinyModel, Path], torch_dtype: torch.dtype | str, error: type[Exception]
) -> None:
    with pytest.raises(error, match="bfloat16"):
        TinyModel.from_pretrained(saved[1], torch_dtype=torch_dtype)


def test_config_only_object_round_trip(tmp_path: Path) -> None:
    scheduler = TinyScheduler.from_config(steps=3)
    scheduler.save_pretrained(tmp_path)
    assert files_in(tmp_path) == {"scheduler_config.json"}
    assert TinyScheduler.from_pretrained(tmp_path).config == TinySchedulerConfig(steps=3)


# --- shards and variants ----------------------------------------------------------------------------


def test_sharded_save_uses_diffusers_names_and_loads(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path, max_shard_size=1000)
    index = json.loads((tmp_path / INDEX).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards == [
        f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)
    ]
    assert index["weight_map"].keys() == model.state_dict().keys()
    assert files_in(tmp_path) == {"config.json", INDEX, *shards}
    assert_same_tensors(TinyModel.from_pretrained(tmp_path), model)


def test_variant_save_and_load(tmp_path: Path) -> None:
    model = tiny_model()
    model.to(torch.bfloat16).save_pretrained(tmp_path, variant="bf16")
    assert files_in(tmp_path) == {"config.json", "diffusion_pytorch_model.bf16.safetensors"}
    loaded = TinyModel.from_pretrained(tmp_path, variant="bf16", torch_dtype="bf16")
    assert_same_tensors(loaded, model, torch.bfloat16)


def test_sharded_variant_names(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path, variant="bf16", max_shard_size=1000)
    index = json.loads((tmp_path / "diffusion_pytorch_model.safetensors.index.bf16.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    assert shards[0] == f"diffusion_pytorch_model.bf16-00001-of-{len(shards):05d}.safetensors"
    assert_same_tensors(TinyModel.from_pretrained(tmp_path, variant="bf16"), model)


@pytest.mark.parametrize(("first", "second"), [(None, 1000), (1000, None)])
def test_resave_replaces_weights_of_another_sharding(
    tmp_path: Path, first: int | None, second: int | None
) -> None:
    """A stale single file (or index) from an earlier save must not shadow the new weights."""
    tiny_model(seed=1).save_pretrained(tmp_path, max_shard_size=first or "10GB")
    tiny_model(seed=1).save_pretrained(tmp_path, variant="fp16")  # another variant: kept
    model = tiny_model(seed=2)
    model.save_pretrained(tmp_path, max_shard_size=second or "10GB")
    assert_same_tensors(TinyModel.from_pretrained(tmp_path), model)
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert (tmp_path / WEIGHTS).is_file() == (second is None)
    assert (tmp_path / INDEX).is_file() == (second is not None)


# --- errors -----------------------------------------------------------------------------------------


def test_missing_path_that_is_not_a_repo_id(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing directory nor a Hub repo id"):
        TinyModel.from_pretrained(tmp_path / "missing")


def test_folder_without_weights(saved: tuple[TinyModel, Path]) -> None:
    folder = saved[1]
    (folder / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"has neither {WEIGHTS} nor {INDEX}"):
        TinyModel.from_pretrained(folder)


def test_folder_without_config_lists_its_files(saved: tuple[TinyModel, Path]) -> None:
    folder = saved[1]
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=rf"config.json does not exist; .* holds: {WEIGHTS}"):
        TinyModel.from_pretrained(folder)


def test_unknown_variant_lists_available_ones(tmp_path: Path) -> None:
    model = tiny_model()
    model.save_pretrained(tmp_path, variant="fp16")
    model.save_pretrained(tmp_path, variant="bf16", max_shard_size=1000)
    with pytest.raises(FileNotFoundError, match="available variants: bf16, fp16"):
        TinyModel.from_pretrained(tmp_path, variant="fp8")
    with pytest.raises(FileNotFoundError, match="only variants bf16, fp16 exist: pass variant='bf16'"):
        TinyModel.from_pretrained(tmp_path)


def test_variant_requested_when_none_exist(saved: tuple[TinyModel, Path]) -> None:
    with pytest.raises(FileNotFoundError, match="no weight variants: leave variant=None"):
        TinyModel.from_pretrained(saved[1], variant="bf16")


def test_truncated_weights_name_the_file(saved: tuple[TinyModel, Path]) -> None:
    path = saved[1] / WEIGHTS
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))}.*truncated or corrupted"):
        TinyModel.from_pretrained(saved[1])


def test_corrupted_header_names_the_file(saved: tuple[TinyModel, Path]) -> None:
    path = saved[1] / WEIGHTS
    path.write_bytes(random.Random(0).randbytes(path.stat().st_size))
    with pytest.raises(CheckpointError, match=f"{re.escape(str(path))} is not a readable safetensors"):
        TinyModel.from_pretrained(saved[1])


def test_missing_shard_and_bad_index(tmp_path: Path) -> None:
    tiny_model().save_pretrained(tmp_path, max_shard_size=1000)
    shard = tmp_path / json.loads((tmp_path / INDEX).read_text())["weight_map"]["proj.weight"]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(shard))):
        TinyModel.from_pretrained(tmp_path)
    (tmp_path / INDEX).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match="not a valid safetensors index"):
        TinyModel.from_pretrained(tmp_path)


@pytest.mark.parametrize("pickle_name", ["diffusion_pytorch_model.bin", "model.ckpt"])
def test_pickle_weights_are_never_loaded(saved: tuple[TinyModel, Path], pickle_name: str) -> None:
    folder = saved[1]
    (folder / WEIGHTS).unlink()
    (folder / pickle_name).write_bytes(b"not even a pickle")
    with pytest.raises(FileNotFoundError, match=r"pickle weights .* never loaded"):
        TinyModel.from_pretrained(folder)
    with pytest.raises(
        CheckpointError, match="pickle file, which can run arbitrary code and is never loaded"
    ):
        read_state_dict([folder / pickle_name])


def test_state_dict_of_another_architecture_lists_every_difference() -> None:
    state_dict = tiny_model().state_dict()
    del state_dict["proj.bias"]
    state_dict["head.weight"] = torch.zeros(2)
    state_dict["conv.weight"] = torch.zeros(16, 3, 1, 1)
    with pytest.raises(CheckpointError) as caught:
        TinyModel.from_state_dict(TinyConfig(), state_dict, source="other.safetensors")
    message = str(caught.value)
    assert "other.safetensors does not fit TinyModel" in message
    assert "1 missing:\n    proj.bias" in message
    assert "1 unexpected:\n    head.weight" in message
    assert "1 shape mismatch:\n    conv.weight: checkpoint (16, 3, 1, 1), model (16, 3, 3, 3)" in message


def test_config_that_does_not_match_the_weights_names_the_file(saved: tuple[TinyModel, Path]) -> None:
    folder = saved[1]
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden": 8}))
    with pytest.raises(
        CheckpointError, match=f"(?s){re.escape(str(folder / WEIGHTS))} does not fit.*mismatch"
    ):
        TinyModel.from_pretrained(folder)


def test_config_of_another_class(saved: tuple[TinyModel, Path]) -> None:
    path = saved[1] / "config.json"
    path.write_text(json.dumps({"_class_name": "PaellaVQModel", "hidden": 16}))
    with pytest.raises(CheckpointError, match="describes a PaellaVQModel, not a TinyModel"):
        TinyModel.from_pretrained(saved[1])
    path.write_text(json.dumps({"_class_name": "TinyModel"}))  # our own class name is accepted too
    TinyModel.from_pretrained(saved[1])


@pytest.mark.parametrize(("text", "match"), [("{not json", "not valid JSON"), ("[1, 2]", "JSON object")])
def test_invalid_config_json(saved: tuple[TinyModel, Path], text: str, match: str) -> None:
    (saved[1] / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=match):
        TinyModel.from_pretrained(saved[1])


# --- Hugging Face Hub, offline ----------------------------------------------------------------------


def fake_hub_cache(cache_dir: Path, repo_id: str, subfolder: str, source: Path) -> Path:
    """The cache layout ``hf_hub_download`` reads: refs/main names a commit whose snapshot holds files."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT / subfolder
    shutil.copytree(source, snapshot)
    return snapshot


def test_loads_from_hub_cache_offline(saved: tuple[TinyModel, Path], tmp_path: Path) -> None:
    model, folder = saved
    cache = tmp_path / "hub"
    fake_hub_cache(cache, "owner/name", "sub", folder)
    loaded = TinyModel.from_pretrained("owner/name", subfolder="sub", cache_dir=cache)
    assert_same_tensors(loaded, model)
    pinned = TinyModel.from_pretrained("owner/name", subfolder="sub", cache_dir=cache, revision=COMMIT)
    assert_same_tensors(pinned, model)


def test_file_missing_from_hub_cache(saved: tuple[TinyModel, Path], tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "owner/name", "sub", saved[1])
    (snapshot / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=f"owner/name/sub/{WEIGHTS} is not in the local Hugging Face"):
        TinyModel.from_pretrained("owner/name", subfolder="sub", cache_dir=cache)
    with pytest.raises(FileNotFoundError, match=r"owner/name/config.json is not in the local Hugging Face"):
        TinyModel.from_pretrained("owner/name", cache_dir=cache)


class RecordingHub:
    """Stands in for ``hf_hub_download``: serves files of a local repo folder and records each request."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.requests: list[str] = []
        self.served: list[str] = []
        self.kwargs: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, filename: str, *, subfolder: str | None, **kwargs: Any) -> str:
        assert repo_id == "owner/name"
        self.requests.append(filename)
        self.kwargs.append(kwargs)
        path = self.repo / (subfolder or "") / filename
        if not path.is_file():
            raise EntryNotFoundError(f"404: {path}")
        self.served.append(filename)
        return str(path)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> RecordingHub:
    fake = RecordingHub(tmp_path / "repo")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    return fake


def test_hub_fetches_only_config_and_one_weights_file(hub: RecordingHub) -> None:
    model = tiny_model()
    model.save_pretrained(hub.repo / "sub")
    model.save_pretrained(hub.repo / "sub", variant="fp16", max_shard_size=1000)
    loaded = TinyModel.from_pretrained(
        "owner/name", "sub", revision="v1", cache_dir="/cache", local_files_only=True, token="tok"
    )
    assert_same_tensors(loaded, model)
    assert hub.requests == ["config.json", WEIGHTS]
    for kwargs in hub.kwargs:
        assert kwargs == {"revision": "v1", "cache_dir": "/cache", "local_files_only": True, "token": "tok"}


def test_hub_fetches_the_index_and_its_shards_only(hub: RecordingHub) -> None:
    model = tiny_model()
    model.save_pretrained(hub.repo / "sub")
    model.save_pretrained(hub.repo / "sub", variant="fp16")
    model.save_pretrained(hub.repo / "sub", variant="bf16", max_shard_size=1000)
    index = "diffusion_pytorch_model.safetensors.index.bf16.json"
    shards = sorted(set(json.loads((hub.repo / "sub" / index).read_text())["weight_map"].values()))
    assert_same_tensors(TinyModel.from_pretrained("owner/name", "sub", variant="bf16"), model)
    assert hub.served == ["config.json", index, *shards]
    assert set(hub.requests) - set(hub.served) == {"diffusion_pytorch_model.bf16.safetensors"}


def test_hub_missing_weights_message(hub: RecordingHub) -> None:
    hub.repo.mkdir()
    (hub.repo / "config.json").write_text("{}")  # a config but no weights
    with pytest.raises(FileNotFoundError, match=f"found neither {WEIGHTS} nor {INDEX}: the Hub repo has no"):
        TinyModel.from_pretrained("owner/name")


# --- configs ----------------------------------------------------------------------------------------


def test_resolve_config() -> None:
    assert TinyModel.resolve_config(None, {}) == TinyConfig()
    assert TinyModel.resolve_config({"hidden": 4, "_class_name": "X"}, {}) == TinyConfig(hidden=4)
    assert TinyModel.resolve_config(TinyConfig(hidden=4), {"in_channels": 2}) == TinyConfig(2, 4)
    assert TinyModel.from_config({"kernel_sizes": [1, 1]}).config.kernel_sizes == (1, 1)
    with pytest.raises(TypeError, match="TinyModel takes a TinyConfig, got UNetConfig"):
        TinyModel.resolve_config(UNetConfig(), {})
    with pytest.raises(TypeError, match="has no field"):
        TinyModel.from_config(width=3)


def test_from_dict_skips_metadata_and_logs_unknown_keys(caplog: pytest.LogCaptureFixture) -> None:
    data = {"_class_name": "TinyDiffusersModel", "_diffusers_version": "0.35.2", "hidden": 4, "extra": 1}
    with caplog.at_level(logging.WARNING, logger="stable_cascade.specs"):
        config = TinyConfig.from_dict(data, source="some/config.json")
    assert config == TinyConfig(hidden=4)
    assert caplog.messages == ["some/config.json: ignoring keys unknown to TinyConfig: extra"]


def test_replace_with_unknown_field_names_the_valid_ones() -> None:
    assert TinyConfig().replace(hidden=2) == TinyConfig(hidden=2)
    with pytest.raises(
        TypeError, match=r"TinyConfig has no field.* width; valid fields: in_channels, hidden"
    ):
        TinyConfig().replace(width=2)
