"""Untrusted folders: pickle weights are never unpickled and a folder's own code never runs.

Each payload writes a marker file when it fires; the tests first prove that it does fire when loaded
the unsafe way, then load it through every public entry and check that the load is refused with a
message and that no marker exists. ``sys.stdin`` answers "y" to any prompt, so a "run the custom
code?" question would run the payload and fail the test instead of hanging it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import pathlib
import shutil
import sys
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest
import torch

import tiny
from stable_cascade import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.loading import components as loading_components
from stable_cascade.loading.components import load_component
from stable_cascade.training import TrainConfig
from stable_cascade.training.components import load_components, load_text_encoder


class WritesMarker:
    """Unpickling this calls ``pathlib.Path(marker).write_text(...)``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (pathlib.Path(self.marker).write_text, ("unpickled",))


REMOTE_CODE = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")
"""


@pytest.fixture(autouse=True)
def hostile_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline, and a stdin that says yes to everything."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n" * 10))


def pickle_folder(folder: Path, marker: Path) -> Path:
    """A CLIP text encoder folder whose only weights are a pickle that writes ``marker``."""
    tiny.text_encoder().config.save_pretrained(folder)
    torch.save({"text_model.embeddings.position_ids": WritesMarker(marker)}, folder / "pytorch_model.bin")
    return folder


def remote_code_folder(folder: Path, marker: Path) -> Path:
    """A model + tokenizer folder whose configs map the Auto classes to ``evil.py`` (writes ``marker``)."""
    tiny.text_encoder().save_pretrained(folder)  # real safetensors weights: only the code is wrong
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}
    config["model_type"] = "stable-cascade-evil"
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer = {"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer))
    (folder / "evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    return folder


def test_the_payloads_fire_when_loaded_unsafely(tmp_path: Path) -> None:
    pickled = pickle_folder(tmp_path / "pickle", tmp_path / "pickle-marker")
    torch.load(pickled / "pytorch_model.bin", weights_only=False)
    assert (tmp_path / "pickle-marker").read_text() == "unpickled"
    remote = remote_code_folder(tmp_path / "remote", tmp_path / "remote-marker")
    spec = importlib.util.spec_from_file_location("evil", remote / "evil.py")
    assert spec is not None and spec.loader is not None
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    assert (tmp_path / "remote-marker").read_text() == "imported"


def prior_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "prior"
    StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(tmp_path / "vocab"),
        text_encoder=tiny.text_encoder(),
        prior=StableCascadeUNet(tiny.TINY_PRIOR),
        scheduler=DDPMWuerstchenScheduler(),
    ).save_pretrained(folder)
    return folder


def with_component(pipeline: Path, name: str, class_name: str, replacement: Path) -> Path:
    shutil.rmtree(pipeline / name)
    shutil.copytree(replacement, pipeline / name)
    index = json.loads((pipeline / "model_index.json").read_text())
    index[name] = ["transformers", class_name]
    (pipeline / "model_index.json").write_text(json.dumps(index))
    return pipeline


@pytest.mark.parametrize("class_name", ["AutoModel", "CLIPTextModelWithProjection", "CLIPTextModel"])
def test_pickle_only_components_are_refused(tmp_path: Path, class_name: str) -> None:
    marker = tmp_path / "marker"
    payload = pickle_folder(tmp_path / "payload", marker)
    pipeline = with_component(prior_folder(tmp_path), "text_encoder", class_name, payload)
    with pytest.raises(CheckpointError, match=r"text_encoder.*only pickle weights \(pytorch_model\.bin\)"):
        StableCascadePriorPipeline.from_pretrained(pipeline)
    with pytest.raises(CheckpointError, match=r"safetensors only.*convert"):
        load_component(pipeline, "text_encoder", "transformers", class_name)
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_text_encoder(pipeline)
    config = TrainConfig(task="stage-c", data=tmp_path, output_dir=tmp_path / "out", pretrained=pipeline)
    with pytest.raises(CheckpointError, match="only pickle weights"):
        load_components(config)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("name", "class_name"), [("text_encoder", "AutoModel"), ("tokenizer", "AutoTokenizer")]
)
def test_folders_with_their_own_code_are_refused(tmp_path: Path, name: str, class_name: str) -> None:
    marker = tmp_path / "marker"
    payload = remote_code_folder(tmp_path / "payload", marker)
    pipeline = with_component(prior_folder(tmp_path), name, class_name, payload)
    with pytest.raises(CheckpointError, match=r"'auto_map' entry.*never runs a folder's code"):
        StableCascadePriorPipeline.from_pretrained(pipeline)
    with pytest.raises(CheckpointError, match="auto_map"):
        load_component(pipeline, name, "transformers", class_name)
    with pytest.raises(CheckpointError, match="auto_map"):
        load_text_encoder(pipeline)
    assert not marker.exists()


def test_transformers_itself_is_told_not_to_unpickle_or_run_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without our folder check (as for a Hub repo), transformers still gets the safe options."""
    monkeypatch.setattr(loading_components, "check_transformers_folder", lambda folder, component: None)
    marker = tmp_path / "marker"
    pickled = pickle_folder(tmp_path / "pickle", marker)
    with pytest.raises(OSError, match="safetensors"):
        load_component(tmp_path, "pickle", "transformers", "AutoModel")
    remote = remote_code_folder(tmp_path / "remote", marker)
    for class_name in ("AutoModel", "AutoConfig", "AutoTokenizer"):
        with pytest.raises(ValueError, match="trust_remote_code"):
            load_component(tmp_path, "remote", "transformers", class_name)
    assert not marker.exists()
    assert pickled.is_dir() and remote.is_dir()


def test_broken_json_files_in_a_transformers_folder_are_named(tmp_path: Path) -> None:
    folder = tmp_path / "tokenizer"
    tiny.tokenizer(folder).save_pretrained(folder)
    (folder / "vocab.json").write_text('{"a": 1,')
    with pytest.raises(CheckpointError, match=r"vocab\.json is not valid JSON"):
        load_component(tmp_path, "tokenizer", "transformers", "CLIPTokenizer")
    (folder / "vocab.json").write_text("[" * 100_000)
    with pytest.raises(CheckpointError, match=r"vocab\.json is nested too deeply"):
        load_component(tmp_path, "tokenizer", "transformers", "CLIPTokenizer")
