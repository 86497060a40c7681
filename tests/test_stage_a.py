"""Stage A: layout of the real config, parity with diffusers' PaellaVQModel, checkpoint round trips."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
    PaellaVQModel as DiffusersPaellaVQModel,
)
from safetensors.torch import load_file

import tiny
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.specs import VQ_VARIANTS

TINY = VQ_VARIANTS["tiny_vqgan"]
# float32 rounding differs between CPUs (summation order of the vectorised kernels)
CLOSE = {"atol": 5e-5, "rtol": 5e-5}


def _listing() -> dict[str, list[int]]:
    listing: dict[str, list[int]] = tiny.listing("diffusers_format_keys")["vqgan"]
    return listing


def _randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values for every parameter and BatchNorm buffer (the gammas are zero at init)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if not tensor.is_floating_point():
                continue
            values = torch.randn(tensor.shape, generator=generator) * 0.3
            if name.endswith("running_var"):
                values = values.abs() + 0.5
            tensor.copy_(values)
    return model.eval()


def _pair() -> tuple[PaellaVQModel, DiffusersPaellaVQModel]:
    reference = _randomize(DiffusersPaellaVQModel(**TINY.to_dict()))
    ours = PaellaVQModel.from_state_dict(TINY, reference.state_dict())
    return ours, reference


def _images(*size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(size, generator=torch.Generator().manual_seed(seed))


def test_real_config_has_the_diffusers_keys_and_shapes() -> None:
    listing = _listing()
    with torch.device("meta"):
        model = PaellaVQModel(VQ_VARIANTS["vqgan"])
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == listing
    # The listing also holds the BatchNorm buffers (running stats, num_batches_tracked).
    buffers = {name for name, _ in model.named_buffers()}
    expected = sum(math.prod(shape) for name, shape in listing.items() if name not in buffers)
    assert sum(p.numel() for p in model.parameters()) == expected
    assert 18.3e6 < expected < 18.5e6


def test_diffusers_argument_names() -> None:
    model = PaellaVQModel(embed_dim=32, bottleneck_blocks=2)
    assert model.config.embed_dim == 32 and model.config.bottleneck_blocks == 2
    assert model.config.scale_factor == pytest.approx(0.3764)
    assert PaellaVQModel({"embed_dim": 32, "levels": 3}).downscale == 8


@pytest.mark.parametrize("size", [(2, 3, 32, 32), (1, 3, 32, 48)])
def test_parity_with_diffusers(size: tuple[int, ...]) -> None:
    ours, reference = _pair()
    x = _images(*size)
    with torch.no_grad():
        latents = ours.encode(x).latents
        torch.testing.assert_close(latents, reference.encode(x).latents, **CLOSE)
        assert latents.shape == (size[0], 4, size[2] // 4, size[3] // 4)
        sample = ours.decode(latents).sample
        torch.testing.assert_close(sample, reference.decode(latents).sample, **CLOSE)
        assert sample.shape == x.shape
        torch.testing.assert_close(ours(x).sample, reference(x).sample, **CLOSE)
        (tupled,) = ours(x, return_dict=False)
        torch.testing.assert_close(tupled, reference(x, return_dict=False)[0], **CLOSE)


def test_quantized_decode_matches_diffusers() -> None:
    ours, reference = _pair()
    latents = ours.encode(_images(1, 3, 16, 24)).latents
    with torch.no_grad():
        quantized = ours.quantize(latents)
        vectors = quantized.permute(0, 2, 3, 1).reshape(-1, 1, 4)  # (B·h·w, 1, C)
        assert (vectors == ours.vquantizer.embedding.weight).all(-1).any(-1).all()
        expected = reference.decode(latents, force_not_quantize=False).sample
        got = ours.decode(latents, force_not_quantize=False).sample
    torch.testing.assert_close(got, expected, **CLOSE)


def test_loads_a_diffusers_save(tmp_path: Path) -> None:
    reference = _randomize(DiffusersPaellaVQModel(**TINY.to_dict()))
    reference.save_pretrained(tmp_path)
    ours = PaellaVQModel.from_pretrained(tmp_path)
    assert ours.config == TINY
    x = _images(1, 3, 32, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).sample, reference(x).sample, **CLOSE)


def test_diffusers_loads_our_save(tmp_path: Path) -> None:
    ours = _randomize(PaellaVQModel(TINY))
    ours.save_pretrained(tmp_path)
    reference = DiffusersPaellaVQModel.from_pretrained(tmp_path).eval()
    x = _images(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(reference(x).sample, ours(x).sample, **CLOSE)
    for name, tensor in load_file(tmp_path / "diffusion_pytorch_model.safetensors").items():
        torch.testing.assert_close(tensor, ours.state_dict()[name], rtol=0, atol=0)


def test_bf16_variant_round_trip(tmp_path: Path) -> None:
    ours = _randomize(PaellaVQModel(TINY)).to(torch.bfloat16)
    ours.save_pretrained(tmp_path, variant="bf16")
    assert (tmp_path / "diffusion_pytorch_model.bf16.safetensors").is_file()
    loaded = PaellaVQModel.from_pretrained(tmp_path, variant="bf16", torch_dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    for name, tensor in ours.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    x = _images(1, 3, 16, 16).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(loaded(x).sample, ours(x).sample)


@pytest.mark.parametrize(
    ("size", "match"),
    [
        ((1, 4, 16, 16), r"3 channels \(B,3,H,W\)"),
        ((3, 16, 16), r"3 channels \(B,3,H,W\)"),
        ((1, 3, 18, 16), r"\(B,3,H,W\) with H and W multiples of 4"),
        ((1, 3, 16, 30), r"\(B,3,H,W\) with H and W multiples of 4"),
    ],
)
def test_encode_rejects_bad_images(size: tuple[int, ...], match: str) -> None:
    model = PaellaVQModel(TINY).eval()
    with pytest.raises(ValueError, match=match):
        model.encode(torch.zeros(size))
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(size))


@pytest.mark.parametrize("size", [(1, 3, 4, 4), (4, 4, 4)])
def test_decode_rejects_bad_latents(size: tuple[int, ...]) -> None:
    model = PaellaVQModel(TINY).eval()
    with pytest.raises(ValueError, match=r"4 channels \(B,4,h,w\)"):
        model.decode(torch.zeros(size))
