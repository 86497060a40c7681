"""Image prompts in the prior pipeline: diffusers' numbers for ``images=`` / ``image_embeds=`` with
several images, strengths (1: diffusers' result, 0: exactly no image), how several images mix, and
negative image prompts; each mistake one clear line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch

import tiny
from stable_cascade import StableCascadePriorPipeline
from stable_cascade.conditioning import ImagePrompt, encode_images

RUN = {"height": 128, "width": 128, "num_inference_steps": 3, "guidance_scale": 3.0}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def pictures(count: int, seed: int = 0) -> list[PIL.Image.Image]:
    rng = np.random.default_rng(seed)
    return [PIL.Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> StableCascadePriorPipeline:
    return tiny.image_prior_pipeline(tmp_path_factory.mktemp("tokenizer"))


def latents(pipe: StableCascadePriorPipeline, **kwargs: Any) -> torch.Tensor:
    return pipe("a red circle", **RUN, **kwargs, generator=seeded()).image_embeddings


def embeds(pipe: StableCascadePriorPipeline, images: list[PIL.Image.Image]) -> torch.Tensor:
    assert pipe.feature_extractor is not None and pipe.image_encoder is not None
    return encode_images(pipe.feature_extractor, pipe.image_encoder, images, "cpu", torch.float32)


def test_several_images_match_diffusers(tmp_path: Path) -> None:
    """diffusers' prior pipeline and ours on identical random weights, two images and their embeddings."""
    reference = tiny.diffusers_prior_pipeline(tmp_path / "build")
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "saved")
    ours = StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    ours.set_progress_bar_config(disable=True)
    images = pictures(2)
    for kwargs in ({"images": images}, {"image_embeds": embeds(ours, images)}):
        expected = reference("a cat", **RUN, **kwargs, generator=seeded()).image_embeddings
        got = ours("a cat", **RUN, **kwargs, generator=seeded()).image_embeddings
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    strengths = [ImagePrompt(image, 1.0) for image in images]  # strength 1 is diffusers' result exactly
    assert torch.equal(latents(ours, images=strengths), latents(ours, images=images))


def test_strength_zero_is_no_image_and_strength_scales_the_embedding(
    pipe: StableCascadePriorPipeline,
) -> None:
    first, second = pictures(2)
    none = latents(pipe)
    assert torch.equal(latents(pipe, images=[ImagePrompt(first, 0.0)]), none)
    assert torch.equal(
        latents(pipe, images=[ImagePrompt(first, 0.0), second]), latents(pipe, images=[second])
    )
    scaled = latents(pipe, image_embeds=0.5 * embeds(pipe, [first]))
    torch.testing.assert_close(latents(pipe, images=[ImagePrompt(first, 0.5)]), scaled)
    assert not torch.allclose(latents(pipe, images=[first]), none)


def test_several_images_mix_as_their_embeddings_one_after_another(pipe: StableCascadePriorPipeline) -> None:
    """Each image is clip_seq tokens of one sequence, in order, each embedding times its strength."""
    first, second = pictures(2, seed=3)
    mixed = latents(pipe, images=[first, ImagePrompt(second, 2.0)])
    both = embeds(pipe, [first, second]) * torch.tensor([1.0, 2.0]).view(1, 2, 1)
    torch.testing.assert_close(mixed, latents(pipe, image_embeds=both))
    assert not torch.allclose(mixed, latents(pipe, images=[first]))


def test_negative_image_prompts_replace_the_unconditional_zeros(pipe: StableCascadePriorPipeline) -> None:
    first, second, third = pictures(3, seed=5)
    one, two, three = (embeds(pipe, [image]) for image in (first, second, third))
    got = latents(pipe, images=[first, second], negative_images=[third])
    padded = torch.cat([three, torch.zeros_like(three)], dim=1)  # the shorter branch gets zeros
    expected = latents(pipe, image_embeds=torch.cat([one, two], dim=1), negative_image_embeds=padded)
    torch.testing.assert_close(got, expected)
    alone = latents(pipe, negative_images=[third])
    torch.testing.assert_close(alone, latents(pipe, negative_image_embeds=three))
    assert not torch.allclose(alone, latents(pipe))
    combined_zeros = latents(pipe, images=[first], negative_image_embeds=torch.zeros_like(one))
    torch.testing.assert_close(combined_zeros, latents(pipe, images=[first]))  # diffusers' own negative


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"images": [ImagePrompt(pictures(1)[0], float("nan"))]},
            r"strength of `images\[0\]` must be a finite",
        ),
        ({"images": [ImagePrompt(pictures(1)[0], float("inf"))]}, "must be a finite number"),
        ({"images": [ImagePrompt(pictures(1)[0], -1.0)]}, "must be >= 0"),
        ({"negative_images": ["x.png"]}, "must be a PIL.Image.Image or a torch.Tensor"),
        (
            {"negative_images": pictures(1), "negative_image_embeds": torch.zeros(1, 1, 16)},
            "either negative_",
        ),
        ({"image_embeds": torch.zeros(1, 1, 5)}, r"must have 16 channels"),
    ],
)
def test_bad_image_prompts_get_one_line(
    pipe: StableCascadePriorPipeline, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises((ValueError, TypeError), match=match) as error:
        latents(pipe, **kwargs)
    assert "\n" not in str(error.value)


def test_image_prompts_need_an_image_encoder(pipe: StableCascadePriorPipeline) -> None:
    bare = StableCascadePriorPipeline(**{**pipe.components, "image_encoder": None, "feature_extractor": None})
    with pytest.raises(ValueError, match="image prompts need the CLIP image encoder") as error:
        latents(bare, images=pictures(1))
    assert "\n" not in str(error.value)
