"""The Stage C ControlNet: released file layouts, inference from keys, loading, errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from stable_cascade.checkpoint import CheckpointError
from stable_cascade.convert.controlnet import controlnet_config_from_state_dict
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.specs.controlnet import CONTROLNET_VARIANTS, ControlNetConfig

#: Keys and shapes of the released controlnet/{canny,inpainting,super_resolution}.safetensors.
RELEASED = json.loads((Path(__file__).parent / "data" / "original_controlnet_keys.json").read_text())

TINY_EFFNET = {
    "effnet_stage_channels": (8, 8, 16, 16, 24, 24),
    "effnet_stage_depths": (1, 2, 1, 2, 1, 2),
    "embedding_channels": 32,
}
TINY = {
    "effnet": ControlNetConfig(in_channels=1, out_channels=32, proj_blocks=(0, 3, 5), **TINY_EFFNET),
    "effnet_rgb": ControlNetConfig(in_channels=3, out_channels=32, proj_blocks=(1,), **TINY_EFFNET),
    "large": ControlNetConfig(
        backbone="large",
        in_channels=4,
        out_channels=32,
        embedding_channels=24,
        large_hidden_channels=32,
        large_channels=8,
        large_blocks=2,
        proj_blocks=(0, 2, 7),
    ),
    "simple": ControlNetConfig(
        backbone="simple", in_channels=5, embedding_channels=5, out_channels=32, proj_blocks=(2, 6)
    ),
}


def _shapes(model: torch.nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in model.state_dict().items()}


def random_controlnet(config: ControlNetConfig, seed: int = 0) -> ControlNet:
    """A ControlNet with every tensor random (the zero-initialised projections too)."""
    torch.manual_seed(seed)
    model = ControlNet(config).eval()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if "running_var" in name:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
            elif tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * 0.2)
    return model


@pytest.mark.parametrize("name", ["canny", "inpainting", "super_resolution"])
def test_released_layouts_equal_meta_built_models(name: str) -> None:
    with torch.device("meta"):
        model = ControlNet(CONTROLNET_VARIANTS[name])
    assert _shapes(model) == RELEASED[name]


@pytest.mark.parametrize("name", ["canny", "inpainting", "super_resolution"])
def test_config_is_inferred_from_the_released_keys(name: str) -> None:
    config = controlnet_config_from_state_dict(RELEASED[name], name)
    assert config == CONTROLNET_VARIANTS[name]
    assert config.control_type == name


@pytest.mark.parametrize("name", sorted(TINY))
def test_single_file_round_trip_infers_every_backbone(name: str, tmp_path: Path) -> None:
    model = random_controlnet(TINY[name])
    path = tmp_path / "cnet.safetensors"
    save_file(model.state_dict(), path)
    loaded = ControlNet.from_single_file(path, proj_blocks=TINY[name].proj_blocks)
    assert loaded.config.replace(control_type=None) == TINY[name]
    control = torch.rand(2, TINY[name].in_channels, 48, 40)
    for ours, theirs in zip(loaded(control), model(control), strict=True):
        assert (ours is None) == (theirs is None)
        if ours is not None and theirs is not None:
            torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_forward_places_residuals_at_the_targets() -> None:
    model = random_controlnet(TINY["large"])
    residuals = model(torch.rand(1, 4, 6, 6))
    assert len(residuals) == 8 == model.num_residuals
    assert [i for i, r in enumerate(residuals) if r is not None] == [0, 2, 7]
    assert all(r is None or r.shape == (1, 32, 6, 6) for r in residuals)


def test_new_controlnet_projects_to_zero() -> None:
    model = ControlNet(TINY["simple"])
    residuals = [r for r in model(torch.rand(1, 5, 4, 4)) if r is not None]
    assert residuals and all(torch.count_nonzero(r) == 0 for r in residuals)


def test_pretrained_round_trip(tmp_path: Path) -> None:
    model = random_controlnet(TINY["effnet"])
    model.save_pretrained(tmp_path)
    loaded = ControlNet.from_pretrained(tmp_path)
    assert loaded.config == model.config
    control = torch.rand(1, 1, 32, 32)
    torch.testing.assert_close(loaded(control)[3], model(control)[3], rtol=0, atol=0)


def test_errors_for_wrong_files_and_inputs(tmp_path: Path) -> None:
    unet_like = {"clip_txt_mapper.weight": [2048, 1280], "embedding.1.weight": [2048, 16, 1, 1]}
    with pytest.raises(CheckpointError, match="not a Stage C ControlNet"):
        controlnet_config_from_state_dict(unet_like, "stage_c.safetensors")
    with pytest.raises(ValueError, match="8 projections but proj_blocks lists 2"):
        controlnet_config_from_state_dict(RELEASED["canny"], "canny", proj_blocks=[0, 1])
    model = random_controlnet(TINY["simple"])
    with pytest.raises(ValueError, match=r"shape \(B, 5, H, W\)"):
        model(torch.rand(1, 3, 8, 8))
    with pytest.raises(ValueError, match="embedding_channels must equal in_channels"):
        ControlNetConfig(backbone="simple", in_channels=3, embedding_channels=4)
    path = tmp_path / "partial.safetensors"
    state = model.state_dict()
    state.pop("backbone.2.weight")
    save_file(state, path)
    with pytest.raises(CheckpointError, match=r"backbone\.2\.weight"):
        ControlNet.from_single_file(path, proj_blocks=(2, 6))
