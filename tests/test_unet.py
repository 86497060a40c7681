"""StableCascadeUNet: real layouts, parity with diffusers on identical random weights, I/O and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableCascadeUNet as DiffusersUNet

import tiny
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import UNET_VARIANTS, UNetConfig

PARAMETERS = {
    "prior": 3_589_103_632,
    "prior_lite": 1_030_785_040,
    "decoder": 1_562_941_136,
    "decoder_lite": 699_471_248,
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights everywhere (zero-initialised gammas/betas included, so parity can fail)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return model.eval()


def pair(config: UNetConfig, seed: int = 0) -> tuple[DiffusersUNet, StableCascadeUNet]:
    reference = randomize_(DiffusersUNet(**config.to_dict()), seed)
    ours = StableCascadeUNet(config).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    return reference, ours


def prior_inputs(config: UNetConfig, batch: int, h: int, w: int, images: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "sample": torch.randn(batch, config.in_channels, h, w, generator=g),
        "timestep_ratio": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
        "clip_text": torch.randn(batch, 7, config.clip_text_in_channels, generator=g),
        "clip_img": torch.randn(batch, images, config.clip_image_in_channels, generator=g),
    }


def decoder_inputs(config: UNetConfig, batch: int, h: int, w: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return {
        "sample": torch.randn(batch, config.in_channels, h, w, generator=g),
        "timestep_ratio": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
        "effnet": torch.randn(batch, config.effnet_in_channels, 5, 3, generator=g),
        "pixels": torch.rand(batch, 3, 8, 8, generator=g),
    }


@pytest.mark.parametrize("name", ["prior", "prior_lite", "decoder", "decoder_lite"])
def test_real_configs_match_the_released_layouts(name: str) -> None:
    listing = tiny.listing("diffusers_format_keys")[name]
    configs = tiny.listing("diffusers_format_unet_configs")
    assert UNET_VARIANTS[name] == UNetConfig.from_dict(configs[name])
    with torch.device("meta"):
        model = StableCascadeUNet(UNET_VARIANTS[name])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listing
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[name]


PRIOR_LIKE = UNET_VARIANTS["tiny_prior"].replace(
    down_num_layers_per_block=(1, 2), up_num_layers_per_block=(2, 1), down_blocks_repeat_mappers=(1, 2)
)
DECODER_LIKE = UNET_VARIANTS["tiny_decoder"]


@pytest.mark.parametrize(("h", "w"), [(8, 8), (7, 5), (3, 11)])
def test_prior_parity_with_diffusers(h: int, w: int) -> None:
    reference, ours = pair(PRIOR_LIKE)
    inputs = prior_inputs(PRIOR_LIKE, batch=2, h=h, w=w)
    with torch.no_grad():
        expected = reference(**inputs).sample
        got = ours(**inputs).sample
    assert got.shape == (2, 16, h, w)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("h", "w"), [(32, 32), (34, 22), (18, 40)])
def test_decoder_parity_with_diffusers(h: int, w: int) -> None:
    reference, ours = pair(DECODER_LIKE)
    inputs = decoder_inputs(DECODER_LIKE, batch=2, h=h, w=w)
    with torch.no_grad():
        expected = reference(**inputs).sample
        got = ours(**inputs).sample
        without_pixels = ours(**{**inputs, "pixels": None}).sample
        expected_without_pixels = reference(**{**inputs, "pixels": None}).sample
    assert got.shape == (2, 4, h, w)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(without_pixels, expected_without_pixels, atol=1e-4, rtol=0)


def test_per_sample_sca_and_crp_match_single_sample_runs() -> None:
    """diffusers fails on per-sample sca/crp for batch > 1; ours equals running each sample alone."""
    reference, ours = pair(PRIOR_LIKE)
    inputs = prior_inputs(PRIOR_LIKE, batch=2, h=6, w=6)
    sca, crp = torch.tensor([0.3, 0.7]), torch.tensor([0.1, 0.9])
    with pytest.raises(RuntimeError):
        reference(**inputs, sca=sca, crp=crp)
    with torch.no_grad():
        got = ours(**inputs, sca=sca, crp=crp).sample
        for i in range(2):
            single = {k: v[i : i + 1] for k, v in inputs.items()}
            expected = reference(**single, sca=sca[i : i + 1], crp=crp[i : i + 1]).sample
            torch.testing.assert_close(got[i : i + 1], expected, atol=1e-4, rtol=0)
        unconditioned = ours(**inputs).sample
    assert not torch.allclose(got, unconditioned, atol=1e-3)  # the conditions are really used


def test_scalar_timestep_and_2d_pooled_text_are_accepted() -> None:
    _, ours = pair(PRIOR_LIKE)
    inputs = prior_inputs(PRIOR_LIKE, batch=2, h=4, w=4)
    inputs["timestep_ratio"] = torch.tensor([0.5, 0.5])
    with torch.no_grad():
        expected = ours(**inputs).sample
        scalar = ours(**{**inputs, "timestep_ratio": 0.5}).sample
        flat = ours(**{**inputs, "clip_text_pooled": inputs["clip_text_pooled"][:, 0]}).sample
    torch.testing.assert_close(scalar, expected)
    torch.testing.assert_close(flat, expected)


def test_missing_image_embedding_is_one_zero_embedding() -> None:
    _, ours = pair(PRIOR_LIKE)
    inputs = prior_inputs(PRIOR_LIKE, batch=1, h=4, w=4)
    with torch.no_grad():
        got = ours(**{**inputs, "clip_img": None}).sample
        expected = ours(**{**inputs, "clip_img": torch.zeros(1, 1, PRIOR_LIKE.clip_image_in_channels)}).sample
    torch.testing.assert_close(got, expected)


def test_gradient_checkpointing_gives_the_same_gradients() -> None:
    _, ours = pair(DECODER_LIKE)  # eval mode: dropout off, so both passes are deterministic
    inputs = decoder_inputs(DECODER_LIKE, batch=1, h=16, w=16)
    ours.zero_grad()
    ours(**inputs).sample.square().mean().backward()
    plain = {n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None}
    ours.zero_grad()
    ours.enable_gradient_checkpointing()
    ours(**inputs).sample.square().mean().backward()
    for name, grad in plain.items():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_diffusers_directory_loads_into_ours_and_back(tmp_path: Path) -> None:
    reference, _ = pair(DECODER_LIKE, seed=3)
    reference.save_pretrained(tmp_path / "from_diffusers")
    ours = StableCascadeUNet.from_pretrained(tmp_path / "from_diffusers")
    assert ours.config == DECODER_LIKE
    inputs = decoder_inputs(DECODER_LIKE, batch=1, h=16, w=20)
    with torch.no_grad():
        torch.testing.assert_close(ours(**inputs).sample, reference(**inputs).sample, atol=1e-4, rtol=0)
    ours.save_pretrained(tmp_path / "from_ours", variant="bf16")
    ours.to(torch.bfloat16).save_pretrained(tmp_path / "from_ours", variant="bf16")
    back = DiffusersUNet.from_pretrained(tmp_path / "from_ours", variant="bf16", torch_dtype=torch.bfloat16)
    for name, tensor in back.state_dict().items():
        torch.testing.assert_close(tensor, ours.state_dict()[name])


def test_from_pretrained_subfolder_dtype_and_sharding(tmp_path: Path) -> None:
    _, ours = pair(PRIOR_LIKE, seed=4)
    ours.save_pretrained(tmp_path / "prior", max_shard_size=20_000)
    assert (tmp_path / "prior" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    loaded = StableCascadeUNet.from_pretrained(tmp_path, subfolder="prior", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert not loaded.training
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor.to(torch.bfloat16))


def test_inputs_without_a_mapper_are_ignored_as_in_diffusers() -> None:
    theirs, ours = pair(PRIOR_LIKE)
    p, d = prior_inputs(PRIOR_LIKE, 1, 4, 4), decoder_inputs(DECODER_LIKE, 1, 16, 16)
    extra = {"effnet": d["effnet"], "pixels": d["pixels"]}
    with torch.no_grad():
        plain = ours(**p).sample
        torch.testing.assert_close(ours(**p, **extra).sample, plain, rtol=0, atol=0)
        torch.testing.assert_close(theirs(**p, **extra).sample, plain)


def test_bad_inputs_say_what_was_expected() -> None:
    _, prior = pair(PRIOR_LIKE)
    _, decoder = pair(DECODER_LIKE)
    p, d = prior_inputs(PRIOR_LIKE, 1, 4, 4), decoder_inputs(DECODER_LIKE, 1, 16, 16)
    cases = [
        (prior, {**p, "sample": torch.randn(1, 4, 4, 4)}, r"\(B, 16, H, W\)"),
        (prior, {**p, "clip_text": None}, "requires clip_text"),
        (prior, {**p, "clip_text": torch.randn(2, 7, 24)}, "batch size"),
        (prior, {**p, "sca": torch.ones(3)}, r"shape \(1,\)"),
        (decoder, {**d, "effnet": None}, "requires effnet"),
        (decoder, {**d, "clip_text": p["clip_text"]}, "pooled text only"),
        (decoder, {**d, "sample": torch.randn(1, 4, 15, 16)}, "multiples of 2"),
        (decoder, {**d, "clip_text_pooled": torch.randn(1, 1, 5)}, "clip_text_pooled must be"),
    ]
    for model, inputs, message in cases:
        with pytest.raises(ValueError, match=message):
            model(**inputs)


def test_bad_configs_and_checkpoints_are_reported(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one entry per level"):
        StableCascadeUNet(block_out_channels=(32, 32, 32))
    with pytest.raises(TypeError, match="no field"):
        StableCascadeUNet(not_an_argument=1)
    with pytest.raises(ValueError, match="num_attention_heads must be between 1 and its 32 channels"):
        UNET_VARIANTS["tiny_prior"].replace(num_attention_heads=(33, 33))
    _, decoder = pair(DECODER_LIKE)
    decoder.save_pretrained(tmp_path / "decoder")
    # Stage B weights under a Stage C config: another architecture.
    config = json.loads((tmp_path / "decoder" / "config.json").read_text())
    (tmp_path / "decoder" / "config.json").write_text(json.dumps({**config, **PRIOR_LIKE.to_dict()}))
    with pytest.raises(CheckpointError, match=r"missing[\s\S]*unexpected[\s\S]*shape mismatch"):
        StableCascadeUNet.from_pretrained(tmp_path / "decoder")
    with pytest.raises(FileNotFoundError, match="no weight variants"):
        StableCascadeUNet.from_pretrained(tmp_path / "decoder", variant="fp16")
    weights = tmp_path / "decoder" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupted"):
        StableCascadeUNet.from_pretrained(tmp_path / "decoder")


FOUR_LEVELS = {
    "block_out_channels": (8, 8, 16, 16),
    "num_attention_heads": (0, 0, 2, 2),
    "down_num_layers_per_block": (1, 1, 1, 1),
    "up_num_layers_per_block": (1, 1, 1, 1),
    "down_blocks_repeat_mappers": (1, 1, 1, 1),
    "up_blocks_repeat_mappers": (1, 1, 1, 1),
    "block_types_per_layer": (
        *[("SDCascadeResBlock", "SDCascadeTimestepBlock")] * 2,
        *[("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock")] * 2,
    ),
    "conditioning_dim": 16,
    "clip_text_pooled_in_channels": 8,
    "clip_seq": 2,
}


@pytest.mark.parametrize(
    "extra",
    [
        {"dropout": (0.0, 0.0, 0.1, 0.1)},
        {"dropout": 0.0, "self_attn": False},
        {"dropout": (0.0, 0.1, 0.1, 0.1), "self_attn": (True, False, True, False)},
    ],
)
def test_per_level_defaults_follow_the_levels_and_save_as_diffusers(extra: dict, tmp_path: Path) -> None:
    kwargs = {**FOUR_LEVELS, **extra}
    theirs, ours = DiffusersUNet(**kwargs), StableCascadeUNet(**kwargs)
    assert len(ours.config.self_attn) == len(ours.config.dropout) == 4
    theirs.save_pretrained(tmp_path / "theirs")
    ours.save_pretrained(tmp_path / "ours")
    saved = [json.loads((tmp_path / n / "config.json").read_text()) for n in ("theirs", "ours")]
    for config in saved:
        config.pop("_diffusers_version")
    assert saved[0] == saved[1]
    ours.load_state_dict(theirs.state_dict(), strict=True)
    reloaded = StableCascadeUNet.from_pretrained(tmp_path / "theirs")
    assert reloaded.config == ours.config
    assert reloaded.config.to_dict() == ours.config.to_dict()


def test_dropout_left_out_is_one_value_per_level() -> None:
    # diffusers' default (0.1, 0.1) only fits two levels; here it follows block_out_channels.
    config = StableCascadeUNet(**FOUR_LEVELS).config
    assert config.dropout == (0.1,) * 4
    assert config.to_dict()["dropout"] == [0.1] * 4
    assert config.to_dict()["self_attn"] is True
    three = config.replace(
        **{k: v[:3] for k, v in FOUR_LEVELS.items() if isinstance(v, tuple)}  # type: ignore[index]
    )
    assert three.dropout == (0.1,) * 3 and three.self_attn == (True,) * 3
    with pytest.raises(TypeError, match="valid fields"):
        StableCascadeUNet(**FOUR_LEVELS, not_a_field=1)
