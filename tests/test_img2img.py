"""Image-to-image, reconstruction, the Stage A round trip and live previews, on tiny pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

import tiny
from stable_cascade import (
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
)
from stable_cascade.conditioning.pixels import effnet_input_size, prepare_images
from stable_cascade.nn.effnet import EfficientNetEncoder
from stable_cascade.nn.layers import resize_like
from stable_cascade.nn.previewer import Previewer
from stable_cascade.pipelines.previews import PreviewCallback, principal_components_rgb

SIZE = {"height": 256, "width": 256}  # Stage C latent 6×6; EfficientNet input 192² → 6×6


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def picture(seed: int = 0, size: tuple[int, int] = (256, 256)) -> PIL.Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)
    return PIL.Image.fromarray(pixels)


@pytest.fixture(scope="module")
def effnet() -> EfficientNetEncoder:
    torch.manual_seed(0)
    return EfficientNetEncoder().eval()


@pytest.fixture(scope="module")
def prior(
    tmp_path_factory: pytest.TempPathFactory, effnet: EfficientNetEncoder
) -> StableCascadePriorPipeline:
    folder = tmp_path_factory.mktemp("prior")
    tiny.diffusers_prior_pipeline(folder / "build").save_pretrained(folder / "saved")
    torch.manual_seed(1)
    previewer = tiny.randomize_(Previewer(), scale=0.05)
    pipe = StableCascadePriorPipeline.from_pretrained(folder / "saved", effnet=effnet, previewer=previewer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def decoder(
    tmp_path_factory: pytest.TempPathFactory, effnet: EfficientNetEncoder
) -> StableCascadeDecoderPipeline:
    folder = tmp_path_factory.mktemp("decoder")
    tiny.diffusers_decoder_pipeline(folder / "build").save_pretrained(folder / "saved")
    pipe = StableCascadeDecoderPipeline.from_pretrained(folder / "saved", effnet=effnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def embeddings(pipe: StableCascadePriorPipeline, **kwargs: Any) -> torch.Tensor:
    out = pipe("a red circle", **SIZE, num_inference_steps=5, generator=seeded(), **kwargs)
    return out.image_embeddings


def test_strength_one_is_text_to_image_draw_for_draw(prior: StableCascadePriorPipeline) -> None:
    torch.testing.assert_close(
        embeddings(prior, image=picture(), strength=1.0), embeddings(prior), rtol=0, atol=0
    )


def test_strength_zero_keeps_the_images_latent(
    prior: StableCascadePriorPipeline, effnet: EfficientNetEncoder
) -> None:
    pixels = prepare_images(picture(), *effnet_input_size(256, 256))
    expected = resize_like(effnet.encode(pixels), (6, 6))
    for strength in (0.0, 0.05):  # 0.05 · 5 steps rounds to no step at all
        torch.testing.assert_close(embeddings(prior, image=picture(), strength=strength), expected)


def test_partial_strength_runs_the_last_steps_from_the_noised_latent(
    prior: StableCascadePriorPipeline,
) -> None:
    times: list[float] = []

    def record(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
        times.append(round(float(t), 4))
        return {}

    partial = embeddings(prior, image=picture(), strength=0.6, callback_on_step_end=record)
    assert times == [0.6, 0.4, 0.2]  # 3 of 5 steps, from t = 0.6 as the reference's 16 of 20 from 0.8
    assert not torch.allclose(partial, embeddings(prior))
    assert not torch.allclose(partial, embeddings(prior, image=picture(1), strength=0.6))


def test_one_image_serves_every_prompt_and_image_per_prompt(prior: StableCascadePriorPipeline) -> None:
    out = prior(
        ["a", "b"], image=picture(), strength=0.6, num_images_per_prompt=2, num_inference_steps=2, **SIZE
    )
    assert out.image_embeddings.shape == (4, 16, 6, 6)
    with pytest.raises(ValueError, match="image has batch 3"):
        prior(["a", "b"], image=[picture(i) for i in range(3)], strength=0.5, num_inference_steps=2, **SIZE)


def test_img2img_errors(prior: StableCascadePriorPipeline, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="strength must be in"):
        embeddings(prior, image=picture(), strength=1.5)
    tiny.diffusers_prior_pipeline(tmp_path / "build").save_pretrained(tmp_path / "saved")
    bare = StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    with pytest.raises(ValueError, match="EfficientNet encoder"):
        bare("x", image=picture(), strength=0.5, num_inference_steps=2)


def test_combined_passes_image_to_image_on(
    prior: StableCascadePriorPipeline, decoder: StableCascadeDecoderPipeline
) -> None:
    combined = StableCascadeCombinedPipeline(
        **{k: v for k, v in decoder.components.items() if k != "effnet"},
        **{f"prior_{k}": v for k, v in prior.components.items()},
    )
    combined.set_progress_bar_config(disable=True)
    steps = {"prior_num_inference_steps": 4, "num_inference_steps": 2, "output_type": "pt"}
    images = combined("x", image=picture(), strength=0.5, **SIZE, **steps, generator=seeded()).images
    assert images.shape == (1, 3, 256, 256)
    assert combined.prior_pipe.effnet is prior.effnet


@pytest.mark.slow
def test_previews_with_and_without_a_previewer(prior: StableCascadePriorPipeline) -> None:
    with_previewer = PreviewCallback(every=2)
    embeddings(prior, callback_on_step_end=with_previewer, callback_on_step_end_tensor_inputs=["denoised"])
    assert len(with_previewer.images) == 3  # steps 0, 2 and 4 of 5
    assert with_previewer.images[0][0].size == (48, 48)  # 8× the 6×6 latent
    shown: list[int] = []
    cheap = PreviewCallback(previewer=None, on_preview=lambda step, images: shown.append(step))
    prior.previewer, kept = None, prior.previewer
    try:
        embeddings(prior, callback_on_step_end=cheap, callback_on_step_end_tensor_inputs=["denoised"])
    finally:
        prior.previewer = kept
    assert shown == [0, 1, 2, 3, 4] and cheap.images[0][0].size == (6, 6)
    with pytest.raises(ValueError, match="tensor_inputs"):
        embeddings(prior, callback_on_step_end=PreviewCallback())


def test_principal_components_preview_is_a_normalised_linear_projection() -> None:
    latent = torch.randn(2, 16, 5, 7, generator=seeded())
    rgb = principal_components_rgb(latent)
    assert rgb.shape == (2, 3, 5, 7)
    assert float(rgb.min()) == 0.0 and float(rgb.max()) == 1.0
    # A latent that varies along one channel direction only: the first component carries it.
    ramp = torch.linspace(-1, 1, 35).view(1, 1, 5, 7) * torch.randn(1, 16, 1, 1, generator=seeded(2))
    first = principal_components_rgb(ramp)[0, 0].flatten()
    assert abs(torch.corrcoef(torch.stack([first, torch.linspace(-1, 1, 35)]))[0, 1]) > 0.999


def test_reconstruction_and_stage_a_round_trip(decoder: StableCascadeDecoderPipeline) -> None:
    image = picture(size=(136, 200))
    out = decoder.reconstruct(image, num_inference_steps=2, output_type="pil", generator=seeded())
    assert out.images[0].size == (200, 136)
    round_trip = decoder.autoencode(image, output_type="pt").images
    pixels = prepare_images(image, 136, 200)
    expected = decoder.vqgan.decode(decoder.vqgan.encode(pixels).latents).sample.clamp(0, 1)
    torch.testing.assert_close(round_trip, expected)
    with pytest.raises(ValueError, match="output_type"):
        decoder.autoencode(image, output_type="latent")


def test_pipelines_with_effnet_and_previewer_save_and_load(
    prior: StableCascadePriorPipeline, tmp_path: Path
) -> None:
    prior.save_pretrained(tmp_path / "prior")
    again = StableCascadePriorPipeline.from_pretrained(tmp_path / "prior")
    assert isinstance(again.effnet, EfficientNetEncoder) and isinstance(again.previewer, Previewer)
    torch.testing.assert_close(
        embeddings(again, image=picture(), strength=0.6), embeddings(prior, image=picture(), strength=0.6)
    )
