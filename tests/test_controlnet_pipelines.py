"""ControlNets in the prior and combined pipelines, on tiny random models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from test_controlnet import TINY_EFFNET, random_controlnet

import tiny
from stable_cascade import StableCascadeCombinedPipeline, StableCascadePriorPipeline
from stable_cascade.conditioning.control import control_input
from stable_cascade.conditioning.pixels import prepare_images
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.specs import EffNetConfig
from stable_cascade.specs.controlnet import ControlNetConfig

SIZE = {"height": 128, "width": 128}  # Stage C latent 3×3
CANNY = ControlNetConfig(
    in_channels=1, out_channels=32, proj_blocks=(0, 3), control_type="canny", **TINY_EFFNET
)
INPAINT = CANNY.replace(in_channels=4, control_type="inpainting")
SUPER_RESOLUTION = ControlNetConfig(
    backbone="large",
    in_channels=16,
    out_channels=32,
    embedding_channels=24,
    large_hidden_channels=32,
    large_channels=8,
    large_blocks=1,
    proj_blocks=(1, 2),
    control_type="super_resolution",
)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int = 0, size: tuple[int, int] = (96, 128)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    pixels[20:60, 30:90] = 255  # a bright block: real edges for canny
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def prior(tmp_path_factory: pytest.TempPathFactory) -> StableCascadePriorPipeline:
    folder = tmp_path_factory.mktemp("prior")
    tiny.diffusers_prior_pipeline(folder / "build").save_pretrained(folder / "saved")
    torch.manual_seed(0)
    effnet = EfficientNetEncoder(EffNetConfig(stage_channels=(8, 8, 16, 16, 24, 24), head_channels=32)).eval()
    pipe = StableCascadePriorPipeline.from_pretrained(folder / "saved", effnet=effnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: StableCascadePriorPipeline, controlnet: ControlNet | None, **kwargs: Any) -> torch.Tensor:
    pipe.controlnet = controlnet
    try:
        out = pipe("a red circle", **SIZE, num_inference_steps=3, generator=seeded(), **kwargs)
    finally:
        pipe.controlnet = None
    return out.image_embeddings


def test_scale_zero_equals_no_controlnet_exactly(prior: StableCascadePriorPipeline) -> None:
    controlnet = random_controlnet(CANNY)
    plain = run(prior, None)
    zero = run(prior, controlnet, control_image=picture(), controlnet_conditioning_scale=0.0)
    full = run(prior, controlnet, control_image=picture())
    half = run(prior, controlnet, control_image=picture(), controlnet_conditioning_scale=0.5)
    assert torch.equal(zero, plain)
    assert (full - plain).abs().max() > 1e-3 and (half - full).abs().max() > 1e-4


def test_preprocessed_control_equals_the_image(prior: StableCascadePriorPipeline) -> None:
    controlnet = random_controlnet(CANNY)
    from_image = run(prior, controlnet, control_image=picture(), num_images_per_prompt=2)
    edges = control_input("canny", picture(), **SIZE)
    from_edges = run(prior, controlnet, control_image=edges, num_images_per_prompt=2)
    assert edges.shape == (1, 1, 128, 128)
    torch.testing.assert_close(from_edges, from_image, rtol=0, atol=0)


def test_super_resolution_samples_twice_the_input_size(prior: StableCascadePriorPipeline) -> None:
    controlnet = random_controlnet(SUPER_RESOLUTION)
    low = picture(size=(64, 64))
    out = run(prior, controlnet, control_image=low)  # 128² output from a 64² input
    assert out.shape == (1, 16, 3, 3)
    plain = run(prior, None)
    assert (out - plain).abs().max() > 1e-3
    encoded = prior.effnet.encode(prepare_images(low, 64, 64))  # type: ignore[union-attr]
    assert encoded.shape[-2:] == (2, 2)  # upsampled ×2 to 4×4 before the ControlNet


def test_control_errors_say_what_to_do(prior: StableCascadePriorPipeline) -> None:
    with pytest.raises(ValueError, match="needs a ControlNet"):
        run(prior, None, control_image=picture())
    canny = random_controlnet(CANNY)
    with pytest.raises(ValueError, match="mask_image is for inpainting"):
        run(prior, canny, control_image=picture(), mask_image=torch.ones(128, 128))
    with pytest.raises(ValueError, match="made for 'canny' control"):
        run(prior, canny, control_image=picture(), control_type="inpainting")
    with pytest.raises(ValueError, match="needs control_image"):
        run(prior, canny)
    unknown = random_controlnet(CANNY.replace(control_type=None))
    with pytest.raises(ValueError, match="pass control_type="):
        run(prior, unknown, control_image=picture())
    assert run(prior, unknown, control_image=picture(), control_type="canny").shape == (1, 16, 3, 3)


def test_combined_inpainting_keeps_the_unmasked_region(tmp_path: Path) -> None:
    reference = tiny.diffusers_combined_pipeline(tmp_path, image_encoding=False)
    reference.save_pretrained(tmp_path / "combined")
    controlnet = random_controlnet(INPAINT)
    pipe = StableCascadeCombinedPipeline.from_pretrained(tmp_path / "combined", prior_controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    mask = torch.zeros(128, 128)
    mask[:, 64:] = 1.0  # generate the right half
    steps = {"prior_num_inference_steps": 2, "num_inference_steps": 2, "generator": seeded(), **SIZE}
    out = pipe("a cat", control_image=picture(), mask_image=mask, output_type="pt", **steps).images
    source = prepare_images(picture(), 128, 128)
    assert torch.equal(out[..., :64], source[..., :64])
    assert (out[..., 64:] - source[..., 64:]).abs().max() > 0.05
    pil = pipe("a cat", control_image=picture(), mask_image=mask, **steps).images[0]
    assert isinstance(pil, PIL.Image.Image) and pil.size == (128, 128)


def test_shipped_demo_controlnet_fits_the_demo_prior() -> None:
    from stable_cascade.demo.recipe import DEMO_DIR
    from stable_cascade.nn.unet import StableCascadeUNet
    from stable_cascade.nn.unet_state import resblock_widths

    controlnet = ControlNet.from_pretrained(DEMO_DIR / "controlnet")
    prior = StableCascadeUNet.from_pretrained(DEMO_DIR / "prior", subfolder="prior")
    assert controlnet.config.control_type == "canny"
    assert controlnet.num_residuals == len(resblock_widths(prior.config)) == 8
    edges = control_input("canny", picture(size=(128, 128)), **SIZE)
    residuals = controlnet(edges)
    assert all(r is not None and r.shape == (1, 192, 4, 4) and r.abs().max() > 0 for r in residuals)
