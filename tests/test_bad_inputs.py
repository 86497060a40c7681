"""Bad numbers and bad files: each gives one clear error naming what failed, before or instead of a
wrong result (a NaN image, a black PNG, a diverged checkpoint, a RecursionError)."""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save_file

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)
from stable_cascade.checkpoint import CheckpointError, read_json_object
from stable_cascade.conditioning import open_image
from stable_cascade.lora import LoRAWeights, add_lora, load_lora_file, save_lora
from stable_cascade.lora.formats import LoRAFormatError
from stable_cascade.specs import EffNetConfig, PreviewerConfig, SchedulerConfig, UNetConfig, VQConfig

STEPS = {"num_inference_steps": 2}
NAN = float("nan")


@pytest.fixture(scope="module")
def prior(tmp_path_factory: pytest.TempPathFactory) -> StableCascadePriorPipeline:
    pipe = StableCascadePriorPipeline(
        tokenizer=tiny.tokenizer(tmp_path_factory.mktemp("tokenizer")),
        text_encoder=tiny.text_encoder(),
        prior=tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), scale=0.1),
        scheduler=DDPMWuerstchenScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decoder_pipeline(folder: Path) -> StableCascadeDecoderPipeline:
    pipe = StableCascadeDecoderPipeline(
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), seed=1, scale=0.1),
        tokenizer=tiny.tokenizer(folder),
        text_encoder=tiny.text_encoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), seed=2, scale=0.1),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings() -> torch.Tensor:
    return torch.randn(1, 16, 3, 3, generator=torch.Generator().manual_seed(0))


def poison_(module: torch.nn.Module) -> None:
    """Every weight NaN."""
    with torch.no_grad():
        for parameter in module.parameters():
            parameter.fill_(NAN)


# -- sampling settings and NaN guards -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "value"),
    [("guidance_scale", math.inf), ("guidance_scale", NAN), ("shift", NAN), ("guidance_rescale", NAN)],
)
def test_non_finite_settings_are_refused_before_sampling(
    prior: StableCascadePriorPipeline, option: str, value: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(prior.prior, "forward", lambda *a, **k: pytest.fail("sampling started"))
    with pytest.raises(ValueError, match=f"{option} must be a finite number"):
        prior("a cat", preset="reference", **{option: value}, **STEPS)


def test_nan_stage_b_is_named_with_advice_for_stage_b(tmp_path: Path) -> None:
    pipe = decoder_pipeline(tmp_path)
    poison_(pipe.decoder)
    with pytest.raises(
        FloatingPointError, match=r"^Stage B \(decoder\) produced NaN/Inf at step 1 of 2"
    ) as error:
        pipe(embeddings(), "a cat", **STEPS)
    assert "\n" not in str(error.value) and "weights" in str(error.value)
    pipe.decoder.half()  # float16 on CPU: the advice is about Stage B, and says to use float32 there
    with pytest.raises(FloatingPointError, match=r"Stage B \(decoder\) overflows in float16") as error:
        pipe(embeddings(), "a cat", **STEPS)
    assert "Stage C" not in str(error.value) and "on CPU, use torch.float32" in str(error.value)


def test_nan_text_encoder_is_blamed_not_the_prior(prior: StableCascadePriorPipeline) -> None:
    encoder = tiny.text_encoder()
    poison_(encoder)
    pipe = StableCascadePriorPipeline(**{**prior.components, "text_encoder": encoder})
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(
        FloatingPointError, match=r"^the conditioning of Stage C \(prior\) \(clip_text, .*text or image"
    ):
        pipe("a cat", **STEPS)


def test_nan_stage_a_stops_instead_of_writing_a_black_image(tmp_path: Path) -> None:
    pipe = decoder_pipeline(tmp_path)
    pipe(embeddings(), "a cat", **STEPS)  # finite as built
    poison_(pipe.vqgan)
    with pytest.raises(FloatingPointError, match=r"^Stage A \(VQGAN\) decoded NaN/Inf pixels .*scale_factor"):
        pipe(embeddings(), "a cat", **STEPS)
    with pytest.raises(FloatingPointError, match="Stage A"):
        pipe.autoencode(torch.rand(1, 3, 16, 16))


# -- config limits ----------------------------------------------------------------------------------


CONFIG_MISTAKES: list[tuple[Any, dict[str, Any], type[Exception], str]] = [
    (UNetConfig, {"block_out_channels": (32, -32)}, ValueError, r"block_out_channels must be at least 1"),
    (UNetConfig, {"block_out_channels": (32, 10**6)}, ValueError, r"at most 65536, got 1000000"),
    (UNetConfig, {"block_out_channels": (8,) * 9}, ValueError, r"9 levels; between 1 and 8"),
    (UNetConfig, {"down_num_layers_per_block": (1, 1000)}, ValueError, r"down_num_layers_per_block.*256"),
    (UNetConfig, {"num_attention_heads": (4096, 2)}, ValueError, r"between 1 and its 32 channels, got 4096"),
    (UNetConfig, {"num_attention_heads": (1.5, 2)}, TypeError, r"num_attention_heads must be whole numbers"),
    (UNetConfig, {"in_channels": 4.5}, TypeError, r"in_channels must be a whole number"),
    (UNetConfig, {"dropout": (0.1, NAN)}, ValueError, r"dropout must be finite"),
    (UNetConfig, {"self_attn": (True,) * 3}, ValueError, r"self_attn has 3 entries"),
    (VQConfig, {"scale_factor": NAN}, ValueError, r"VQConfig.scale_factor must be finite"),
    (VQConfig, {"levels": 0}, ValueError, r"VQConfig.levels must be at least 1"),
    (VQConfig, {"embed_dim": -8}, ValueError, r"embed_dim must be at least 1"),
    (SchedulerConfig, {"s": 0.0}, ValueError, r"s must be greater than 0"),
    (EffNetConfig, {"head_channels": 10**7}, ValueError, r"head_channels must be .* at most 65536"),
    (PreviewerConfig, {"c_in": True}, TypeError, r"c_in must be a whole number"),
]


@pytest.mark.parametrize(("cls", "change", "error", "message"), CONFIG_MISTAKES)
def test_absurd_config_values_are_refused_before_building(
    cls: Any, change: dict[str, Any], error: type[Exception], message: str
) -> None:
    base = tiny.TINY_PRIOR.to_dict() if cls is UNetConfig else {}
    with pytest.raises(error, match=message):
        cls.from_dict({**base, **change})


def test_a_config_file_with_a_bad_value_is_named(tmp_path: Path) -> None:
    folder = tmp_path / "vqgan"
    PaellaVQModel(tiny.TINY_VQGAN).save_pretrained(folder)
    text = (folder / "config.json").read_text().replace('"scale_factor": 0.3764', '"scale_factor": NaN')
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"vqgan/config.json: VQConfig.scale_factor must be finite"):
        PaellaVQModel.from_pretrained(folder)


# -- JSON files ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000, "nested too deeply"),
        ('{"a": ', "is not valid JSON"),
        ("[1, 2]", r"must hold a JSON object \({...}\), got a list"),
    ],
    ids=["deep", "syntax", "list"],
)
def test_json_errors_name_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(
        CheckpointError, match=f"{path}.*{message}" if "nested" in message else message
    ) as error:
        read_json_object(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_non_utf8_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": "\xff"}')
    with pytest.raises(CheckpointError, match=r"config.json is not a UTF-8 text file"):
        read_json_object(path)


# -- LoRA files ---------------------------------------------------------------------------------------


def lora_file(path: Path, down: torch.Tensor, up: torch.Tensor, alpha: float | None = None) -> Path:
    tensors = {"unet.layer.lora_down.weight": down, "unet.layer.lora_up.weight": up}
    if alpha is not None:
        tensors["unet.layer.alpha"] = torch.tensor(alpha)
    save_file(tensors, path, metadata={"format": "stable-cascade-lora"})
    return path


def test_lora_mistakes_are_clear(tmp_path: Path, prior: StableCascadePriorPipeline) -> None:
    save_file({}, tmp_path / "empty.safetensors", metadata={"format": "stable-cascade-lora"})
    with pytest.raises(LoRAFormatError, match=r"empty.safetensors holds no tensors"):
        load_lora_file(tmp_path / "empty.safetensors")
    with pytest.raises(LoRAFormatError, match="rank 0"):
        load_lora_file(lora_file(tmp_path / "rank0.safetensors", torch.zeros(0, 8), torch.zeros(8, 0)))
    nan = torch.full((2, 8), NAN)
    with pytest.raises(LoRAFormatError, match=r"layer layer holds NaN/Inf"):
        load_lora_file(lora_file(tmp_path / "nan.safetensors", nan, torch.zeros(8, 2)))
    with pytest.raises(LoRAFormatError, match=r"NaN/Inf"):
        load_lora_file(lora_file(tmp_path / "alpha.safetensors", torch.ones(2, 8), torch.ones(8, 2), NAN))
    with pytest.raises(LoRAFormatError, match="holds no LoRA layers"):
        prior.load_lora_weights(LoRAWeights(unet={}))
    assert prior.get_active_adapters() == []


def test_non_finite_lora_scales_are_refused(tmp_path: Path, prior: StableCascadePriorPipeline) -> None:
    unet = StableCascadeUNet(tiny.TINY_PRIOR)
    add_lora(unet, rank=2)
    path = save_lora(tmp_path / "style.safetensors", unet)
    for scale in (NAN, math.inf):
        with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
            prior.load_lora_weights(path, scale=scale)
    assert prior.get_active_adapters() == []
    prior.load_lora_weights(path)
    try:
        with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
            prior.set_lora_scale(NAN)
        with pytest.raises(ValueError, match="LoRA scale must be a finite number"):
            prior.fuse_lora(scale=math.inf)
    finally:
        prior.unload_lora_weights()


# -- images -------------------------------------------------------------------------------------------


def png_claiming(png: bytes, width: int, height: int) -> bytes:
    """``png`` with its IHDR chunk rewritten to declare ``width``×``height`` (CRC fixed)."""
    start = png.index(b"IHDR")
    body = struct.pack(">II", width, height) + png[start + 12 : start + 17]  # depth, colour, …
    chunk = b"IHDR" + body
    return png[:start] + chunk + struct.pack(">I", zlib.crc32(chunk)) + png[start + 21 :]


def test_open_image_names_the_file_and_refuses_bombs(tmp_path: Path) -> None:
    path = tmp_path / "small.png"
    PIL.Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(path)
    assert open_image(path).size == (6, 4)
    with pytest.raises(ValueError, match=r"small.png is too large to open safely .*6×4 = 24 pixels"):
        open_image(path, max_pixels=23)
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_claiming(path.read_bytes(), 20_000, 20_000))  # 400 megapixels, a few bytes
    with pytest.raises(PIL.Image.DecompressionBombError):  # the header really declares that size
        PIL.Image.open(bomb)
    with pytest.raises(ValueError, match=r"bomb.png is too large to open safely"):
        open_image(bomb)
    big = tmp_path / "big.png"  # 100 megapixels: PIL only warns, and would decode it
    big.write_bytes(png_claiming(path.read_bytes(), 10_000, 10_000))
    with pytest.raises(ValueError, match=r"big.png is too large .*10000×10000 = 100,000,000 pixels"):
        open_image(big)
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"text.png is not an image file"):
        open_image(tmp_path / "text.png")
    with pytest.raises(FileNotFoundError, match=r"missing.png does not exist"):
        open_image(tmp_path / "missing.png")
    noise = tmp_path / "noise.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(noise)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(noise.read_bytes()[:4000])
    with pytest.raises(ValueError, match=r"truncated.png could not be decoded"):
        open_image(truncated)
