"""Loading refuses what it cannot use, in one line and before anything large is built: integer tensors
in a model file, absurd text-encoder configs, tokenizer folders without a vocabulary, shard indexes
that point outside the model folder; an fp8 LoRA loads (upcast), an integer one is refused."""

from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModelWithProjection, CLIPTokenizer

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.loading.components import transformers_from_pretrained
from stable_cascade.lora.formats import LoRAFormatError, load_lora_file

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(autouse=True)
def within_seconds() -> Iterator[None]:
    """A missing check must fail the test, not build a 10⁹-row embedding or 200,000 layers."""

    def stop(*_: Any) -> None:
        raise TimeoutError("no error within 20 s: the loader started building")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def one_line(error: pytest.ExceptionInfo[BaseException]) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# -- non-float weights -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cls", "config"), [(StableCascadeUNet, tiny.TINY_PRIOR), (PaellaVQModel, tiny.TINY_VQGAN)]
)
def test_integer_weights_are_refused_before_loading(cls: Any, config: Any, tmp_path: Path) -> None:
    cls(config).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / WEIGHTS)
    name = next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim > 1)
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, tmp_path / WEIGHTS, metadata={"format": "pt"})
    with pytest.raises(
        CheckpointError, match=rf"tensor {name} is torch.int32, but model weights must be floating"
    ):
        cls.from_pretrained(tmp_path)


# -- text encoder configs and tokenizers ------------------------------------------------------------


BAD_TEXT_CONFIGS = [
    ({"vocab_size": 10**9}, r"vocab_size must be at least 1 and at most 1048576, got 1000000000"),
    ({"hidden_size": -1}, r"hidden_size must be at least 1 and at most 65536, got -1"),
    ({"num_hidden_layers": 200_000}, r"num_hidden_layers must be at least 1 and at most 256, got 200000"),
    ({"num_attention_heads": 5}, r"hidden_size 24 is not a multiple of num_attention_heads 5"),
    ({"intermediate_size": "37"}, r"intermediate_size must be a whole number"),
]


@pytest.fixture(scope="module")
def text_encoder_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("text_encoder")
    tiny.text_encoder().save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("change", "message"), BAD_TEXT_CONFIGS)
def test_bad_text_encoder_configs_stop_before_building(
    text_encoder_folder: Path, change: dict[str, Any], message: str, tmp_path: Path
) -> None:
    folder = tmp_path / "text_encoder"
    shutil.copytree(text_encoder_folder, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    started = time.monotonic()
    with pytest.raises((ValueError, TypeError), match=message) as error:
        transformers_from_pretrained(CLIPTextModelWithProjection, folder, "text_encoder")
    assert time.monotonic() - started < 5
    assert "config.json" in one_line(error)


def test_a_hub_text_encoder_config_is_checked_before_building(
    text_encoder_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(text_encoder_folder, repo / "text_encoder")
    config = json.loads((repo / "text_encoder" / "config.json").read_text())
    (repo / "text_encoder" / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 200_000}))

    def download(repo_id: str, filename: str, *, subfolder: str | None = None, **_: Any) -> str:
        return str(repo / (subfolder or "") / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    with pytest.raises(ValueError, match=r"text_encoder/config.json: num_hidden_layers must be"):
        transformers_from_pretrained(
            CLIPTextModelWithProjection, "owner/name", "text_encoder", "text_encoder"
        )


@pytest.fixture(scope="module")
def prior_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("prior")
    StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(folder / "build"),
        text_encoder=tiny.text_encoder(),
        prior=StableCascadeUNet(tiny.TINY_PRIOR),
        scheduler=DDPMWuerstchenScheduler(),
    ).save_pretrained(folder / "saved")
    return folder / "saved"


def test_a_pipeline_with_a_bad_text_encoder_config_stops_in_one_line(
    prior_folder: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "prior"
    shutil.copytree(prior_folder, folder)
    config = json.loads((folder / "text_encoder" / "config.json").read_text())
    (folder / "text_encoder" / "config.json").write_text(json.dumps({**config, "vocab_size": 10**9}))
    with pytest.raises(ValueError, match="vocab_size must be") as error:
        StableCascadePriorPipeline.from_pretrained(folder)
    one_line(error)


@pytest.mark.parametrize(
    "removed",
    [("tokenizer.json",), ("tokenizer.json", "vocab.json"), ("tokenizer.json", "vocab.json", "merges.txt")],
)
def test_a_tokenizer_without_a_vocabulary_is_an_error(
    prior_folder: Path, tmp_path: Path, removed: tuple[str, ...]
) -> None:
    folder = tmp_path / "prior"
    shutil.copytree(prior_folder, folder)
    present = {p.name for p in (folder / "tokenizer").iterdir()}
    for name in removed:
        (folder / "tokenizer" / name).unlink(missing_ok=True)
    if present - set(removed) >= {"vocab.json", "merges.txt"}:  # the slow files still describe it
        assert len(StableCascadePriorPipeline.from_pretrained(folder).tokenizer) > 2
        return
    with pytest.raises(CheckpointError, match=r"holds no vocabulary.*needs tokenizer.json") as error:
        StableCascadePriorPipeline.from_pretrained(folder)
    one_line(error)


def test_a_complete_tokenizer_still_loads(prior_folder: Path) -> None:
    tokenizer = transformers_from_pretrained(CLIPTokenizer, prior_folder / "tokenizer", "tokenizer")
    assert len(tokenizer("a red circle").input_ids) > 3


# -- shard indexes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shard",
    ["../../outside/x.safetensors", "../x.safetensors", "/etc/x.safetensors", "C:\\x.safetensors", "x.bin"],
)
def test_index_entries_must_stay_inside_the_model_folder(shard: str, tmp_path: Path) -> None:
    model = StableCascadeUNet(tiny.TINY_PRIOR)
    model.save_pretrained(tmp_path / "model", max_shard_size=20_000)
    index_path = tmp_path / "model" / f"{WEIGHTS}.index.json"
    index = json.loads(index_path.read_text())
    first = next(iter(index["weight_map"]))
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(tmp_path / "model" / index["weight_map"][first], outside / "x.safetensors")
    index["weight_map"][first] = shard
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"not a \.safetensors file in the model's folder") as error:
        StableCascadeUNet.from_pretrained(tmp_path / "model")
    one_line(error)


def test_a_transformers_index_is_checked_too(text_encoder_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "text_encoder"
    shutil.copytree(text_encoder_folder, folder)
    weights = next(folder.glob("*.safetensors")).name
    index = {"metadata": {}, "weight_map": {"text_projection.weight": f"../../outside/{weights}"}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model's folder"):
        transformers_from_pretrained(CLIPTextModelWithProjection, folder, "text_encoder")


# -- LoRA files in fp8 and integers ----------------------------------------------------------------


def cast_lora(path: str, out: Path, dtype: torch.dtype) -> Path:
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = {k: v.to(dtype) if v.ndim else v for k, v in load_file(path).items()}
    save_file(tensors, out, metadata=metadata)
    return out


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_an_fp8_lora_loads_upcast(dtype: torch.dtype, tmp_path: Path) -> None:
    original = tiny.lora_file(tmp_path / "lora.safetensors", seed=0)
    weights = load_lora_file(cast_lora(original, tmp_path / "fp8.safetensors", dtype))
    reference = load_lora_file(original)
    for name, layer in weights.unet.items():
        assert layer.down.dtype == layer.up.dtype == torch.float32
        torch.testing.assert_close(layer.down, reference.unet[name].down.to(dtype).float())
    unet = StableCascadeUNet(tiny.TINY_PRIOR)
    pipe = StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(tmp_path / "tok"),
        text_encoder=tiny.text_encoder(),
        prior=unet,
        scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.load_lora_weights(str(tmp_path / "fp8.safetensors"))
    assert pipe.get_active_adapters() == ["fp8"]


def test_an_integer_lora_is_refused_in_one_line(tmp_path: Path) -> None:
    original = tiny.lora_file(tmp_path / "lora.safetensors", seed=0)
    with pytest.raises(LoRAFormatError, match=r"is torch.int8; LoRA weights must be floating point") as error:
        load_lora_file(cast_lora(original, tmp_path / "int8.safetensors", torch.int8))
    one_line(error)
