"""``from_single_file`` on original-layout files with random weights: parity, dtypes, export, errors."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from diffusers.pipelines.deprecated.wuerstchen.modeling_paella_vq_model import (
    PaellaVQModel as DiffusersPaellaVQModel,
)
from safetensors.torch import load_file, save_file

import tiny
from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert import (
    Kind,
    expect_kind,
    unet_diffusers_to_original,
    vq_diffusers_to_original,
)
from stable_cascade.nn.stage_a import PaellaVQModel
from stable_cascade.nn.unet import StableCascadeUNet
from stable_cascade.specs import UNetConfig

CONFIGS = {"prior": tiny.TINY_PRIOR, "decoder": tiny.TINY_DECODER}


def reference_unet(config: UNetConfig, seed: int = 0) -> diffusers.StableCascadeUNet:
    return tiny.randomize_(diffusers.StableCascadeUNet(**config.to_dict()), seed)


def write(path: Path, state_dict: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
    return path


def inputs(config: UNetConfig) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    batch, size = 2, (16, 16) if config.is_stage_b else (4, 4)
    values = {
        "sample": torch.randn(batch, config.in_channels, *size, generator=g),
        "timestep_ratio": torch.rand(batch, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=g),
    }
    if config.is_stage_b:
        values["effnet"] = torch.randn(batch, config.effnet_in_channels or 0, 3, 3, generator=g)
    else:
        values["clip_text"] = torch.randn(batch, 5, config.clip_text_in_channels or 0, generator=g)
        values["clip_img"] = torch.randn(batch, 1, config.clip_image_in_channels or 0, generator=g)
    return values


@pytest.mark.parametrize("name", CONFIGS)
def test_original_file_loads_and_matches_the_diffusers_layout_model(tmp_path: Path, name: str) -> None:
    config = CONFIGS[name]
    reference = reference_unet(config)
    weights = reference.state_dict()
    path = write(tmp_path / f"stage_{name}.safetensors", unet_diffusers_to_original(weights))

    loaded = StableCascadeUNet.from_single_file(path)
    same_weights = StableCascadeUNet.from_state_dict(config, weights)
    assert loaded.config == config and loaded.dtype == torch.float32 and not loaded.training
    values = inputs(config)
    with torch.no_grad():
        got = loaded(**values).sample
        expected = same_weights(**values).sample
        diffusers_output = reference(**values).sample
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(got, diffusers_output, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", CONFIGS)
def test_export_gives_back_the_file(tmp_path: Path, name: str) -> None:
    original = unet_diffusers_to_original(reference_unet(CONFIGS[name]).state_dict())
    path = write(tmp_path / "unet.safetensors", original)
    exported = StableCascadeUNet.from_single_file(path).to_single_file_state_dict()
    file = load_file(path)
    assert exported.keys() == file.keys()
    assert all(torch.equal(exported[k], v) for k, v in file.items())
    write(tmp_path / "again.safetensors", exported)  # no shared storage left from the q/k/v split


def test_diffusers_layout_file_and_bundle_load_too(tmp_path: Path) -> None:
    weights = reference_unet(tiny.TINY_DECODER).state_dict()
    vq = tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN)).state_dict()
    plain = StableCascadeUNet.from_single_file(write(tmp_path / "diffusers.safetensors", weights))
    bundle = {
        **{f"model.diffusion_model.{k}": v for k, v in unet_diffusers_to_original(weights).items()},
        **{f"vae.{k}": v for k, v in vq_diffusers_to_original(vq).items()},
        "text_encoder.text_model.final_layer_norm.weight": torch.ones(4),
    }
    path = write(tmp_path / "comfy_stage_b.safetensors", bundle)
    from_bundle = StableCascadeUNet.from_single_file(path)
    for key, tensor in weights.items():
        assert torch.equal(plain.state_dict()[key], tensor) and torch.equal(
            from_bundle.state_dict()[key], tensor
        )
    stage_a = PaellaVQModel.from_single_file(path)
    assert stage_a.config == tiny.TINY_VQGAN.replace(scale_factor=0.43)
    assert all(torch.equal(stage_a.state_dict()[k], v) for k, v in vq.items())


def test_bf16_file_and_torch_dtype(tmp_path: Path) -> None:
    original = unet_diffusers_to_original(reference_unet(tiny.TINY_PRIOR).state_dict())
    bf16 = {k: v.to(torch.bfloat16) for k, v in original.items()}
    path = write(tmp_path / "stage_c_bf16.safetensors", bf16)
    as_bf16 = StableCascadeUNet.from_single_file(path, torch_dtype=torch.bfloat16)
    as_fp32 = StableCascadeUNet.from_single_file(path)
    assert as_bf16.dtype == torch.bfloat16 and as_fp32.dtype == torch.float32
    exported = as_bf16.to_single_file_state_dict()
    assert all(torch.equal(exported[k], v) for k, v in bf16.items())
    for key, tensor in as_fp32.to_single_file_state_dict().items():
        assert torch.equal(tensor, bf16[key].float()), key
    with torch.no_grad():
        output = as_bf16(**{k: v.to(torch.bfloat16) for k, v in inputs(tiny.TINY_PRIOR).items()}).sample
    assert output.dtype == torch.bfloat16 and torch.isfinite(output).all()


def test_stage_a_single_file(tmp_path: Path) -> None:
    reference = tiny.randomize_(DiffusersPaellaVQModel(**tiny.TINY_VQGAN.to_dict()), seed=3)
    weights = reference.state_dict()
    path = write(tmp_path / "stage_a.safetensors", vq_diffusers_to_original(weights))
    loaded = PaellaVQModel.from_single_file(path)
    assert loaded.config == tiny.TINY_VQGAN.replace(scale_factor=0.43)
    same_weights = PaellaVQModel.from_state_dict(tiny.TINY_VQGAN, weights)
    latents = torch.randn(2, 4, 3, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = loaded.decode(latents).sample
        torch.testing.assert_close(got, same_weights.decode(latents).sample, atol=0, rtol=0)
        torch.testing.assert_close(got, reference.decode(latents).sample, atol=1e-5, rtol=0)
    exported = loaded.to_single_file_state_dict()
    assert all(torch.equal(exported[k], v) for k, v in load_file(path).items())


# -- errors ------------------------------------------------------------------------------------------


def test_stage_b_file_where_stage_c_is_expected(tmp_path: Path) -> None:
    original = unet_diffusers_to_original(reference_unet(tiny.TINY_DECODER).state_dict())
    path = write(tmp_path / "stage_b.safetensors", original)
    with pytest.raises(
        CheckpointError, match=r"is a Stage B \(decoder\) checkpoint, not a Stage C \(prior\) one"
    ):
        expect_kind(load_file(path), Kind.STAGE_C, str(path))


def test_vq_file_given_to_the_unet_and_unet_file_given_to_stage_a(tmp_path: Path) -> None:
    vq = vq_diffusers_to_original(tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN)).state_dict())
    vq_path = write(tmp_path / "stage_a.safetensors", vq)
    with pytest.raises(CheckpointError, match=r"Stage A \(VQGAN\) checkpoint.*PaellaVQModel"):
        StableCascadeUNet.from_single_file(vq_path)
    unet = unet_diffusers_to_original(reference_unet(tiny.TINY_PRIOR).state_dict())
    unet_path = write(tmp_path / "stage_c.safetensors", unet)
    with pytest.raises(
        CheckpointError, match=r"Stage C \(prior\) checkpoint, not a Stage A.*StableCascadeUNet"
    ):
        PaellaVQModel.from_single_file(unet_path)


def test_truncated_file(tmp_path: Path) -> None:
    path = write(tmp_path / "stage_c.safetensors", reference_unet(tiny.TINY_PRIOR).state_dict())
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        StableCascadeUNet.from_single_file(path)


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    weights = reference_unet(tiny.TINY_PRIOR).state_dict()
    path = tmp_path / "stage_c.ckpt"
    torch.save(unet_diffusers_to_original(weights), path)
    with pytest.raises(CheckpointError, match="pickle"):
        StableCascadeUNet.from_single_file(path)
    loaded = StableCascadeUNet.from_single_file(path, allow_pickle=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())


def test_unrelated_keys(tmp_path: Path) -> None:
    path = write(tmp_path / "other.safetensors", {"encoder.conv.weight": torch.zeros(2, 2)})
    with pytest.raises(CheckpointError, match="not a recognised Stable Cascade checkpoint"):
        StableCascadeUNet.from_single_file(path)
    with pytest.raises(CheckpointError, match="not a recognised Stable Cascade checkpoint"):
        PaellaVQModel.from_single_file(path)


def test_inconsistent_tensors_name_the_file(tmp_path: Path) -> None:
    original = unet_diffusers_to_original(reference_unet(tiny.TINY_PRIOR).state_dict())
    original["down_blocks.0.0.depthwise.weight"] = torch.zeros(8, 1, 3, 3)
    path = write(tmp_path / "broken.safetensors", original)
    with pytest.raises(CheckpointError, match=r"broken\.safetensors"):
        StableCascadeUNet.from_single_file(path)
