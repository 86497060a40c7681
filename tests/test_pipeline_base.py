"""The pipeline base: diffusers' pipeline directory layout both ways, Hub loading, placement, offload, errors.

Test pipelines mirroring the prior and decoder constructors are defined here; every component is tiny
and built in the test (``tests/tiny.py``), and nothing is downloaded.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import diffusers
import huggingface_hub
import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import PaellaVQModel as DiffusersVQ
from huggingface_hub.errors import EntryNotFoundError
from torch import nn
from transformers import (
    CLIPImageProcessor,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionModelWithProjection,
)

import tiny
from stable_cascade import DDPMWuerstchenScheduler, PaellaVQModel, StableCascadeUNet
from stable_cascade.loading.components import load_component, read_model_index
from stable_cascade.pipelines import offload
from stable_cascade.pipelines.base import Pipeline

COMMIT = "0123456789abcdef0123456789abcdef01234567"
PROMPT = "a photo of a cat"


class PriorPipeline(Pipeline):
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModelWithProjection
    prior: StableCascadeUNet
    scheduler: DDPMWuerstchenScheduler
    feature_extractor: CLIPImageProcessor | None
    image_encoder: CLIPVisionModelWithProjection | None

    diffusers_class_name = "StableCascadePriorPipeline"
    optional_components = frozenset({"feature_extractor", "image_encoder"})
    offload_order = ("image_encoder", "text_encoder", "prior")

    def __init__(
        self,
        tokenizer: Any,
        text_encoder: Any,
        prior: Any,
        scheduler: Any,
        resolution_multiple: float = 42.67,
        feature_extractor: Any = None,
        image_encoder: Any = None,
    ) -> None:
        super().__init__()
        self.register_components(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            prior=prior,
            scheduler=scheduler,
            feature_extractor=feature_extractor,
            image_encoder=image_encoder,
        )
        self.register_config(resolution_multiple=resolution_multiple)


class DecoderPipeline(Pipeline):
    decoder: StableCascadeUNet
    vqgan: PaellaVQModel

    diffusers_class_name = "StableCascadeDecoderPipeline"
    offload_order = ("text_encoder", "decoder", "vqgan")

    def __init__(
        self,
        decoder: Any,
        tokenizer: Any,
        text_encoder: Any,
        scheduler: Any,
        vqgan: Any,
        latent_dim_scale: float = 10.67,
    ) -> None:
        super().__init__()
        self.register_components(
            decoder=decoder, tokenizer=tokenizer, text_encoder=text_encoder, scheduler=scheduler, vqgan=vqgan
        )
        self.register_config(latent_dim_scale=latent_dim_scale)


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test may reach the network; hub 2.4 reads ``constants.HF_HUB_OFFLINE`` at call time."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def prior_pipeline(tmp_path: Path, image_encoding: bool = False, seed: int = 0) -> PriorPipeline:
    return PriorPipeline(
        tokenizer=tiny.tokenizer(tmp_path / "vocab"),
        text_encoder=tiny.text_encoder(seed),
        prior=tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), seed),
        scheduler=DDPMWuerstchenScheduler(),
        resolution_multiple=40.0,
        feature_extractor=tiny.feature_extractor() if image_encoding else None,
        image_encoder=tiny.image_encoder(seed) if image_encoding else None,
    )


def diffusers_twin(pipe: PriorPipeline) -> Any:
    """diffusers' prior pipeline holding our pipeline's weights."""
    unet = diffusers.StableCascadeUNet(**tiny.TINY_PRIOR.to_dict())
    unet.load_state_dict(pipe.prior.state_dict())
    return diffusers.StableCascadePriorPipeline(
        tokenizer=pipe.tokenizer,
        text_encoder=pipe.text_encoder,
        prior=unet.eval(),
        scheduler=diffusers.DDPMWuerstchenScheduler(),
        resolution_multiple=pipe.config.resolution_multiple,
    )


def assert_same_weights(loaded: nn.Module, original: nn.Module, dtype: torch.dtype = torch.float32) -> None:
    expected, actual = original.state_dict(), loaded.state_dict()
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        cast = tensor.to(dtype) if tensor.is_floating_point() else tensor  # not BatchNorm's step count
        assert actual[key].dtype == cast.dtype and torch.equal(actual[key], cast), key


def assert_same_prior_pipeline(loaded: Any, original: PriorPipeline) -> None:
    assert type(loaded.prior).__name__ == "StableCascadeUNet"
    assert_same_weights(loaded.prior, original.prior)
    assert_same_weights(loaded.text_encoder, original.text_encoder)
    assert loaded.tokenizer(PROMPT).input_ids == original.tokenizer(PROMPT).input_ids
    assert loaded.config.resolution_multiple == original.config.resolution_multiple
    assert {k: loaded.scheduler.config[k] for k in ("scaler", "s")} == original.scheduler.config.to_dict()


# --- diffusers directories --------------------------------------------------------------------------


def test_loads_a_prior_directory_saved_by_diffusers(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path)
    diffusers_twin(ours).save_pretrained(tmp_path / "saved")
    loaded = PriorPipeline.from_pretrained(tmp_path / "saved")
    assert_same_prior_pipeline(loaded, ours)
    assert isinstance(loaded.prior, StableCascadeUNet)
    assert isinstance(loaded.scheduler, DDPMWuerstchenScheduler)
    assert isinstance(loaded.tokenizer, CLIPTokenizer)
    assert loaded.image_encoder is None and loaded.feature_extractor is None


def test_save_loads_back_into_ours_and_into_diffusers(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    index = read_model_index(tmp_path / "saved")
    assert index["_class_name"] == "StableCascadePriorPipeline" and "_diffusers_version" in index
    assert index["prior"] == ["diffusers", "StableCascadeUNet"]
    assert index["scheduler"] == ["diffusers", "DDPMWuerstchenScheduler"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["image_encoder"] == [None, None] and index["resolution_multiple"] == 40.0
    assert_same_prior_pipeline(PriorPipeline.from_pretrained(tmp_path / "saved"), ours)
    theirs = diffusers.StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    assert_same_prior_pipeline(theirs, ours)


def test_optional_image_encoder_round_trip(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path, image_encoding=True)
    ours.save_pretrained(tmp_path / "saved")
    loaded = PriorPipeline.from_pretrained(tmp_path / "saved")
    assert_same_weights(loaded.image_encoder, ours.image_encoder)
    assert loaded.feature_extractor.crop_size == ours.feature_extractor.crop_size


def test_loads_a_decoder_directory_saved_by_diffusers(tmp_path: Path) -> None:
    unet = tiny.randomize_(diffusers.StableCascadeUNet(**tiny.TINY_DECODER.to_dict()), 1)
    vqgan = tiny.randomize_(DiffusersVQ(**tiny.TINY_VQGAN.to_dict()), 2)
    diffusers.StableCascadeDecoderPipeline(
        decoder=unet,
        tokenizer=tiny.tokenizer(tmp_path / "vocab"),
        text_encoder=tiny.text_encoder(),
        scheduler=diffusers.DDPMWuerstchenScheduler(),
        vqgan=vqgan,
    ).save_pretrained(tmp_path / "saved")
    loaded = DecoderPipeline.from_pretrained(tmp_path / "saved")
    assert isinstance(loaded.decoder, StableCascadeUNet) and isinstance(loaded.vqgan, PaellaVQModel)
    assert_same_weights(loaded.decoder, unet)
    assert_same_weights(loaded.vqgan, vqgan)
    assert loaded.config.latent_dim_scale == 10.67
    # Older diffusers wrote the VQGAN as ["wuerstchen", "PaellaVQModel"].
    alone = load_component(tmp_path / "saved", "vqgan", "wuerstchen", "PaellaVQModel", torch_dtype="bf16")
    assert_same_weights(alone, vqgan, torch.bfloat16)


# --- loading options --------------------------------------------------------------------------------


def test_subfolders_and_component_overrides(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    lite = tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), seed=5)
    lite.save_pretrained(tmp_path / "saved" / "prior_lite")
    encoder = tiny.text_encoder(seed=3)
    loaded = PriorPipeline.from_pretrained(
        tmp_path / "saved", subfolders={"prior": "prior_lite"}, text_encoder=encoder, resolution_multiple=50.0
    )
    assert_same_weights(loaded.prior, lite)
    assert loaded.text_encoder is encoder
    assert loaded.config.resolution_multiple == 50.0 == loaded.resolution_multiple


def test_torch_dtype_applies_to_models_only(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path, image_encoding=True).to(torch.bfloat16)
    ours.save_pretrained(tmp_path / "saved")
    loaded = PriorPipeline.from_pretrained(tmp_path / "saved", torch_dtype=torch.bfloat16)
    for name in ("prior", "text_encoder", "image_encoder"):
        assert_same_weights(getattr(loaded, name), getattr(ours, name), torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert loaded.tokenizer(PROMPT).input_ids == ours.tokenizer(PROMPT).input_ids
    assert isinstance(loaded.scheduler, DDPMWuerstchenScheduler)
    default = PriorPipeline.from_pretrained(tmp_path / "saved")  # float32 unless asked, as in diffusers
    assert {m.dtype for m in (default.prior, default.text_encoder, default.image_encoder)} == {torch.float32}


def test_variant_save_and_load(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path)
    ours.save_pretrained(tmp_path / "saved", variant="bf16")
    assert (tmp_path / "saved" / "prior" / "diffusion_pytorch_model.bf16.safetensors").is_file()
    assert (tmp_path / "saved" / "text_encoder" / "model.bf16.safetensors").is_file()
    assert_same_prior_pipeline(PriorPipeline.from_pretrained(tmp_path / "saved", variant="bf16"), ours)
    with pytest.raises(OSError, match=r"component 'text_encoder' \(transformers\.CLIPTextModel"):
        PriorPipeline.from_pretrained(tmp_path / "saved")
    with pytest.raises(FileNotFoundError, match="pass variant='bf16'"):
        PriorPipeline.from_pretrained(tmp_path / "saved", text_encoder=ours.text_encoder)


def test_loads_every_component_from_the_hub_cache(tmp_path: Path) -> None:
    ours = prior_pipeline(tmp_path)
    ours.save_pretrained(tmp_path / "saved")
    repo = tmp_path / "cache" / "models--owner--name"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    shutil.copytree(tmp_path / "saved", repo / "snapshots" / COMMIT)
    loaded = PriorPipeline.from_pretrained("owner/name", cache_dir=tmp_path / "cache")
    assert_same_prior_pipeline(loaded, ours)


def test_hub_options_reach_our_components(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ours = prior_pipeline(tmp_path)
    ours.save_pretrained(tmp_path / "repo")
    requests: list[tuple[str | None, str, dict[str, Any]]] = []

    def fake_download(repo_id: str, filename: str, *, subfolder: str | None, **kwargs: Any) -> str:
        assert repo_id == "owner/name"
        requests.append((subfolder, filename, kwargs))
        path = tmp_path / "repo" / (subfolder or "") / filename
        if not path.is_file():
            raise EntryNotFoundError(f"404: {path}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    options: dict[str, Any] = {
        "revision": "v1",
        "cache_dir": "/cache",
        "local_files_only": True,
        "token": "tok",
    }
    # transformers has its own Hub client: its components are passed in, ours come through the fake.
    loaded = PriorPipeline.from_pretrained(
        "owner/name", tokenizer=ours.tokenizer, text_encoder=ours.text_encoder, **options
    )
    assert_same_weights(loaded.prior, ours.prior)
    assert [(s, f) for s, f, _ in requests] == [
        (None, "model_index.json"),
        ("prior", "config.json"),
        ("prior", "diffusion_pytorch_model.safetensors"),
        ("scheduler", "scheduler_config.json"),
    ]
    assert all(kwargs == options for _, _, kwargs in requests)


# --- registration, placement, progress bars ---------------------------------------------------------


def test_components_config_and_placement(tmp_path: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    assert list(pipe.components) == [
        "tokenizer",
        "text_encoder",
        "prior",
        "scheduler",
        "feature_extractor",
        "image_encoder",
    ]
    assert PriorPipeline.component_names() == tuple(pipe.components)
    assert PriorPipeline.config_names() == ("resolution_multiple",)
    assert pipe.config["resolution_multiple"] == pipe.config.resolution_multiple == 40.0
    with pytest.raises(AttributeError, match="has no 'height'"):
        _ = pipe.config.height
    copy = PriorPipeline(**pipe.components, **pipe.config)
    assert copy.prior is pipe.prior and copy.config == pipe.config
    assert pipe.device == torch.device("cpu") == pipe.execution_device
    assert pipe.to(torch.float64) is pipe
    assert pipe.dtype == pipe.prior.dtype == pipe.text_encoder.dtype == torch.float64
    pipe.to("cpu", dtype="bf16")
    assert pipe.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="reserved"):
        pipe.register_components(device=None)


def test_progress_bar(tmp_path: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    bar = pipe.progress_bar(range(3))
    assert bar.disable and list(bar) == [0, 1, 2]
    out = io.StringIO()
    pipe.set_progress_bar_config(desc="prior", file=out)  # replaces the earlier options
    with pipe.progress_bar(total=2) as bar:
        bar.update(2)
    assert "prior" in out.getvalue() and "2/2" in out.getvalue()
    with pytest.raises(ValueError, match="iterable or a total"):
        pipe.progress_bar()


# --- offload ----------------------------------------------------------------------------------------


def run(pipe: PriorPipeline) -> torch.Tensor:
    """The text encoder, then one prior evaluation, each through ``activate`` as ``__call__`` does."""
    device = pipe.execution_device
    ids = pipe.tokenizer([PROMPT], return_tensors="pt").input_ids.to(device)
    text = pipe.activate("text_encoder")(ids, output_hidden_states=True)
    sample = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)).to(device)
    prior = pipe.activate("prior")
    eps = prior(
        sample, 0.5, clip_text_pooled=text.text_embeds[:, None], clip_text=text.hidden_states[-1]
    ).sample
    pipe.offload_all()
    return eps


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_identical_outputs(tmp_path: Path, mode: str) -> None:
    pipe = prior_pipeline(tmp_path, image_encoding=True)
    expected = run(pipe)
    getattr(pipe, f"enable_{mode}_cpu_offload")(device="cpu")
    assert pipe.execution_device == torch.device("cpu")
    assert torch.equal(run(pipe), expected)
    assert torch.equal(run(pipe), expected)  # a second call finds every model back in place


def test_model_offload_keeps_only_the_active_model_on_the_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    placed: dict[int, torch.device] = {}  # placements are recorded, not done: the GPU is never touched
    monkeypatch.setattr(offload, "place", lambda model, device: placed.__setitem__(id(model), device))
    pipe = prior_pipeline(tmp_path, image_encoding=True)
    gpu, cpu = torch.device("cuda", 1), torch.device("cpu")

    def where() -> dict[str, torch.device]:
        return {name: placed[id(getattr(pipe, name))] for name in pipe.offload_order}

    pipe.enable_model_cpu_offload(device=gpu)
    assert where() == {"image_encoder": cpu, "text_encoder": cpu, "prior": cpu}
    assert pipe.execution_device == gpu
    assert pipe.activate("prior") is pipe.prior
    assert where() == {"image_encoder": cpu, "text_encoder": cpu, "prior": gpu}
    pipe.activate("text_encoder")
    assert where() == {"image_encoder": cpu, "text_encoder": gpu, "prior": cpu}
    assert pipe.activate("tokenizer") is pipe.tokenizer
    pipe.offload_all()
    assert set(where().values()) == {cpu}
    with pytest.raises(ValueError, match=r"call disable_offload\(\) before to"):
        pipe.to("cpu")
    with pytest.raises(ValueError, match="no component 'unet'"):
        pipe.activate("unet")
    pipe.disable_offload()
    assert pipe.execution_device == pipe.device
    pipe.use_execution_device(gpu)  # another pipeline's offload places the shared models
    placed.clear()
    assert pipe.execution_device == gpu and pipe.activate("prior") is pipe.prior and placed == {}


def test_sequential_offload_moves_each_module_for_its_forward_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    moves: list[tuple[nn.Module, str]] = []  # recorded, not done
    monkeypatch.setattr(
        offload, "move_own_tensors", lambda module, device: moves.append((module, device.type))
    )
    pipe = prior_pipeline(tmp_path)
    pipe.enable_sequential_cpu_offload(device="cuda:1")
    assert pipe.execution_device == torch.device("cuda", 1) and pipe.device == torch.device("cpu")
    pipe.text_encoder(pipe.tokenizer([PROMPT], return_tensors="pt").input_ids)
    owners = [m for m in pipe.text_encoder.modules() if offload.owns_tensors(m)]
    assert {id(m) for m, _ in moves} == {id(m) for m in owners}
    for owner in owners:
        assert [device for m, device in moves if m is owner] == ["cuda", "cpu"]
    pipe.disable_offload()
    moves.clear()
    pipe.text_encoder(pipe.tokenizer([PROMPT], return_tensors="pt").input_ids)
    assert moves == []


def test_offload_device_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    pipe = prior_pipeline(tmp_path)
    for enable in (pipe.enable_model_cpu_offload, pipe.enable_sequential_cpu_offload):
        with pytest.raises(ValueError, match="CUDA is not available; pass device='cpu'"):
            enable()
        with pytest.raises(ValueError, match="gpu_id or device, not both"):
            enable(gpu_id=0, device="cpu")

    class Incomplete(PriorPipeline):
        offload_order = ("prior",)

    with pytest.raises(TypeError, match="lacks model"):
        Incomplete(**pipe.components).enable_model_cpu_offload(device="cpu")


# --- errors -----------------------------------------------------------------------------------------

DELETE = object()


@pytest.mark.parametrize(
    ("edit", "error", "match"),
    [
        (
            {"_class_name": "StableCascadeDecoderPipeline"},
            ValueError,
            "describes a StableCascadeDecoderPipeline, not a StableCascadePriorPipeline; load it with "
            r"\w*DecoderPipeline.from_pretrained",
        ),
        ({"_class_name": DELETE}, ValueError, "has no '_class_name'"),
        (
            {"scheduler": ["diffusers", "EulerDiscreteScheduler"]},
            ValueError,
            r"\['diffusers', 'EulerDiscreteScheduler'\].*supported: \['diffusers', 'StableCascadeUNet'\]",
        ),
        ({"text_encoder": ["transformers", "NoSuchModel"]}, ValueError, "no loadable class"),
        ({"prior": DELETE}, ValueError, "no entry for the required component 'prior'; pass it"),
        ({"prior": "unet"}, ValueError, r"'prior' must be \[library, class\]"),
    ],
)
def test_bad_model_index(tmp_path: Path, edit: dict[str, Any], error: type[Exception], match: str) -> None:
    prior_pipeline(tmp_path).save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "model_index.json"
    index = json.loads(path.read_text())
    for key, value in edit.items():
        if value is DELETE:
            del index[key]
        else:
            index[key] = value
    path.write_text(json.dumps(index))
    with pytest.raises(error, match=match):
        PriorPipeline.from_pretrained(tmp_path / "saved")


def test_loading_errors(tmp_path: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    pipe.prior.save_pretrained(tmp_path / "unet")
    with pytest.raises(FileNotFoundError, match=r"no model_index.json .* pass a pipeline folder"):
        PriorPipeline.from_pretrained(tmp_path / "unet")
    pipe.save_pretrained(tmp_path / "saved")
    with pytest.raises(TypeError, match=r"unexpected argument.* unet; components: tokenizer, text_encoder"):
        PriorPipeline.from_pretrained(tmp_path / "saved", unet=pipe.prior)
    with pytest.raises(TypeError, match="subfolders names unknown component"):
        PriorPipeline.from_pretrained(tmp_path / "saved", subfolders={"resolution_multiple": "x"})
    with pytest.raises(TypeError, match="not both"):
        PriorPipeline.from_pretrained(tmp_path / "saved", subfolders={"prior": "x"}, prior=pipe.prior)
    with pytest.raises(ValueError, match="declares absent"):
        PriorPipeline.from_pretrained(tmp_path / "saved", subfolders={"image_encoder": "x"})
    with pytest.raises(ValueError, match=r"load it with \w*PriorPipeline\.from_pretrained"):
        DecoderPipeline.from_pretrained(tmp_path / "saved")
    shutil.rmtree(tmp_path / "saved" / "prior")
    with pytest.raises(FileNotFoundError, match="has no folder 'prior' for component 'prior'"):
        PriorPipeline.from_pretrained(tmp_path / "saved")


def test_our_own_class_name_is_accepted(tmp_path: Path) -> None:
    pipe = prior_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "model_index.json"
    path.write_text(path.read_text().replace('"StableCascadePriorPipeline"', '"PriorPipeline"'))
    assert PriorPipeline.describes_self(tmp_path / "saved") and not DecoderPipeline.describes_self(
        tmp_path / "saved"
    )
    assert_same_prior_pipeline(PriorPipeline.from_pretrained(tmp_path / "saved"), pipe)


def test_model_index_names_transformers_classes_as_every_version_knows_them() -> None:
    """Without torchvision, transformers 5 makes a ``CLIPImageProcessorPil``; the folder must still load
    with transformers 4 (and with diffusers), which know ``CLIPImageProcessor``."""
    from transformers import CLIPImageProcessor

    from stable_cascade.loading.components import component_entry

    assert component_entry(CLIPImageProcessor()) == ("transformers", "CLIPImageProcessor")
