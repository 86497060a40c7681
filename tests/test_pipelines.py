"""The three pipelines against diffusers: tiny random pipelines built and saved by diffusers, loaded
by ours, run with the same seeds; then what ours does beyond diffusers."""

from __future__ import annotations

import math
from collections.abc import Callable
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

STEPS = {"num_inference_steps": 4}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StableCascadePriorPipeline]:
    return tiny.diffusers_and_ours(tmp_path_factory.mktemp("prior"), "prior")


@pytest.fixture(scope="module")
def decoder_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StableCascadeDecoderPipeline]:
    return tiny.diffusers_and_ours(tmp_path_factory.mktemp("decoder"), "decoder")


def both(pair: tuple[Any, Any], **kwargs: Any) -> tuple[Any, Any]:
    """Run diffusers and ours with the same arguments and fresh, equally seeded generators."""
    reference, ours = pair
    seed = kwargs.pop("seed", 0)
    expected = reference(**kwargs, generator=seeded(seed))
    got = ours(**kwargs, generator=seeded(seed))
    return expected, got


def assert_close(got: Any, expected: Any, atol: float = 1e-4) -> None:
    if isinstance(expected, list) and expected and isinstance(expected[0], PIL.Image.Image):
        assert [im.size for im in got] == [im.size for im in expected]
        for a, b in zip(got, expected, strict=True):
            diff = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
            assert diff.max() <= 1, f"PIL images differ by {diff.max()}"
        return
    torch.testing.assert_close(torch.as_tensor(got), torch.as_tensor(expected), atol=atol, rtol=1e-4)


PRIOR_CASES: dict[str, dict[str, Any]] = {
    "cfg": {"prompt": "a red circle", "guidance_scale": 4.0},
    "no_cfg": {"prompt": "a red circle", "guidance_scale": 1.0},
    "negative": {"prompt": ["a cat", "a dog"], "negative_prompt": ["blurry", "dark"], "guidance_scale": 3.0},
    "per_prompt": {"prompt": ["a cat", "a dog"], "num_images_per_prompt": 2},
    "non_square": {"prompt": "a tree", "height": 128, "width": 344},
    "numpy": {"prompt": "a tree", "output_type": "np"},
    "image_embeds": {"prompt": "a cat", "image_embeds": torch.randn(1, 2, tiny.IMAGE_WIDTH)},
}


@pytest.mark.parametrize("case", PRIOR_CASES, ids=str)
def test_prior_matches_diffusers(prior_pair: tuple[Any, Any], case: str) -> None:
    kwargs = {"height": 256, "width": 256, **STEPS, **PRIOR_CASES[case]}
    expected, got = both(prior_pair, **kwargs)
    for name in ("image_embeddings", "prompt_embeds", "prompt_embeds_pooled", "negative_prompt_embeds"):
        if getattr(expected, name) is None:
            assert getattr(got, name) is None
        else:
            assert_close(getattr(got, name), getattr(expected, name))


def test_prior_with_images_given_latents_and_generator_lists(prior_pair: tuple[Any, Any]) -> None:
    reference, ours = prior_pair
    rng = np.random.default_rng(0)
    pictures = [PIL.Image.fromarray(rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)) for _ in range(2)]
    latents = torch.randn(2, 16, 6, 6, generator=seeded(5))
    kwargs = {
        "prompt": ["a", "b"],
        "images": pictures,
        "latents": latents,
        "height": 256,
        "width": 256,
        **STEPS,
    }
    expected = reference(**kwargs, generator=[seeded(1), seeded(2)])
    got = ours(**kwargs, generator=[seeded(1), seeded(2)])
    assert_close(got.image_embeddings, expected.image_embeddings)
    tuple_out = ours(**kwargs, generator=[seeded(1), seeded(2)], return_dict=False)
    assert isinstance(tuple_out, tuple) and len(tuple_out) == 5
    assert_close(tuple_out[0], expected.image_embeddings)


def test_precomputed_embeddings_match(prior_pair: tuple[Any, Any]) -> None:
    reference, ours = prior_pair
    first = ours(prompt="a blue square", **STEPS, generator=seeded())
    kwargs = {
        "prompt_embeds": first.prompt_embeds,
        "prompt_embeds_pooled": first.prompt_embeds_pooled,
        "negative_prompt_embeds": first.negative_prompt_embeds,
        "negative_prompt_embeds_pooled": first.negative_prompt_embeds_pooled,
        **STEPS,
    }
    expected, got = reference(**kwargs, generator=seeded()), ours(**kwargs, generator=seeded())
    assert_close(got.image_embeddings, expected.image_embeddings)
    assert_close(got.image_embeddings, first.image_embeddings)


DECODER_CASES: dict[str, dict[str, Any]] = {
    "pil": {"prompt": "a red circle"},
    "cfg_np": {
        "prompt": ["a", "b"],
        "guidance_scale": 2.0,
        "negative_prompt": ["x", "y"],
        "output_type": "np",
    },
    "pt": {"prompt": "a red circle", "output_type": "pt"},
    "latent": {"prompt": "a red circle", "output_type": "latent"},
    "per_prompt": {"prompt": "a red circle", "num_images_per_prompt": 2, "output_type": "pt"},
}


@pytest.mark.parametrize("case", DECODER_CASES, ids=str)
def test_decoder_matches_diffusers(decoder_pair: tuple[Any, Any], case: str) -> None:
    kwargs = dict(DECODER_CASES[case])
    batch = 1 if isinstance(kwargs["prompt"], str) else len(kwargs["prompt"])
    kwargs["image_embeddings"] = torch.randn(batch, 16, 3, 6, generator=seeded(3))
    expected, got = both(decoder_pair, **kwargs, **STEPS)
    assert_close(got.images, expected.images)


def test_combined_matches_diffusers(tmp_path: Path) -> None:
    reference = tiny.diffusers_combined_pipeline(tmp_path)
    reference.set_progress_bar_config(disable=True)
    reference.save_pretrained(tmp_path / "combined")
    ours = StableCascadeCombinedPipeline.from_pretrained(tmp_path / "combined")
    ours.set_progress_bar_config(disable=True)
    kwargs = {
        "prompt": ["a red circle", "a blue square"],
        "height": 128,
        "width": 256,
        "prior_num_inference_steps": 3,
        "num_inference_steps": 3,
        "num_images_per_prompt": 2,
        "output_type": "pt",
    }
    expected, got = both((reference, ours), **kwargs)
    assert got.images.shape == (4, 3, 128, 256)
    assert_close(got.images, expected.images)


# -- beyond diffusers ---------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width"), [(200, 328), (136, 64), (720, 1024)])
def test_every_multiple_of_8_gives_exactly_that_size(
    prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any], height: int, width: int
) -> None:
    prior, decoder = prior_pair[1], decoder_pair[1]
    combined = StableCascadeCombinedPipeline(
        **{k: v for k, v in decoder.components.items() if k != "effnet"},
        **{f"prior_{k}": v for k, v in prior.components.items()},
    )
    combined.set_progress_bar_config(disable=True)
    steps = {"prior_num_inference_steps": 2, "num_inference_steps": 2}
    images = combined("a house", height=height, width=width, **steps, generator=seeded()).images
    assert images[0].size == (width, height)


def test_diffusers_crashes_where_ours_does_not(decoder_pair: tuple[Any, Any]) -> None:
    reference, ours = decoder_pair
    embeddings = torch.randn(1, 16, 5, 8, generator=seeded())  # Stage C latent of 200×328
    with pytest.raises(RuntimeError):  # int(5 * 10.67) = 53: an odd Stage B latent
        reference(embeddings, prompt="x", **STEPS, output_type="pt")
    image = ours(embeddings, prompt="x", height=200, width=328, **STEPS, output_type="pt").images
    assert image.shape == (1, 3, 200, 328)
    fallback = ours(embeddings, prompt="x", **STEPS, output_type="latent").images
    assert fallback.shape[-2:] == (54, 86)  # diffusers' rule, rounded up to an even size


def test_custom_timesteps_are_honoured(prior_pair: tuple[Any, Any]) -> None:
    ours = prior_pair[1]
    kwargs = {"prompt": "x", "height": 128, "width": 128}
    linear = ours(**kwargs, num_inference_steps=4, generator=seeded()).image_embeddings
    same = ours(**kwargs, timesteps=[1.0, 0.75, 0.5, 0.25, 0.0], generator=seeded()).image_embeddings
    other = ours(**kwargs, timesteps=[1.0, 0.9, 0.3, 0.0], generator=seeded()).image_embeddings
    torch.testing.assert_close(same, linear)
    assert not torch.allclose(other, linear)


@pytest.mark.parametrize("sampler", ["ddim", "euler_ancestral", "dpmpp_2m"])
def test_other_samplers_run_on_both_stages(
    prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any], sampler: str
) -> None:
    embeddings = prior_pair[1]("x", height=128, width=128, sampler=sampler, **STEPS, generator=seeded())
    ddpm = prior_pair[1]("x", height=128, width=128, **STEPS, generator=seeded())
    assert torch.isfinite(embeddings.image_embeddings).all()
    assert not torch.allclose(embeddings.image_embeddings, ddpm.image_embeddings)
    images = decoder_pair[1](
        embeddings.image_embeddings, "x", sampler=sampler, output_type="pt", **STEPS
    ).images
    assert torch.isfinite(images).all() and images.shape == (1, 3, 128, 128)


def test_offload_changes_nothing_on_cpu(prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any]) -> None:
    for pair, kwargs in ((prior_pair, {"prompt": "x"}), (decoder_pair, {"prompt": "x", "output_type": "pt"})):
        ours = pair[1]
        if isinstance(ours, StableCascadeDecoderPipeline):
            kwargs["image_embeddings"] = torch.randn(1, 16, 3, 3, generator=seeded(9))
        plain = ours(**kwargs, **STEPS, generator=seeded())[0]
        for enable in (ours.enable_model_cpu_offload, ours.enable_sequential_cpu_offload):
            enable(device="cpu")
            torch.testing.assert_close(ours(**kwargs, **STEPS, generator=seeded())[0], plain)
        ours.disable_offload()


def test_callbacks_see_and_replace_latents(prior_pair: tuple[Any, Any]) -> None:
    ours = prior_pair[1]
    seen: list[int] = []

    def zero_at_the_end(pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
        seen.append(i)
        assert set(tensors) == {"latents", "text_encoder_hidden_states"}
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else {}

    out = ours(
        "x",
        **STEPS,
        callback_on_step_end=zero_at_the_end,
        callback_on_step_end_tensor_inputs=["latents", "text_encoder_hidden_states"],
    )
    assert seen == [0, 1, 2, 3]
    assert not out.image_embeddings.any()


ERRORS: list[tuple[str, Callable[[Any], Any], type[Exception], str]] = [
    ("prompt_and_embeds", lambda p: p("x", prompt_embeds=torch.zeros(1, 77, 24)), ValueError, "prompt"),
    ("negative_batch", lambda p: p(["a", "b"], negative_prompt=["c"]), ValueError, "negative"),
    ("size", lambda p: p("x", height=1020), ValueError, "multiple of 8"),
    (
        "latents_shape",
        lambda p: p("x", latents=torch.zeros(1, 16, 5, 5)),
        ValueError,
        "latents must have shape",
    ),
    ("output_type", lambda p: p("x", output_type="pil"), ValueError, "output_type"),
    ("preset", lambda p: p("x", preset="fast"), ValueError, "preset"),
    ("sampler", lambda p: p("x", sampler="heun9"), ValueError, "sampler"),
    ("callback", lambda p: p("x", callback_on_step_end_tensor_inputs=["x0"]), ValueError, "may only name"),
    (
        "images_and_embeds",
        lambda p: p("x", images=[torch.rand(3, 8, 8)], image_embeds=torch.zeros(1, 1, 16)),
        ValueError,
        "either images or image_embeds",
    ),
]


@pytest.mark.parametrize(("name", "call", "error", "message"), ERRORS, ids=[e[0] for e in ERRORS])
def test_prior_errors_say_what_to_do(
    prior_pair: tuple[Any, Any], name: str, call: Callable[[Any], Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        call(prior_pair[1])


def test_images_without_an_image_encoder_are_refused(tmp_path: Path) -> None:
    reference = tiny.diffusers_prior_pipeline(tmp_path / "build", image_encoding=False)
    reference.save_pretrained(tmp_path / "saved")
    ours = StableCascadePriorPipeline.from_pretrained(tmp_path / "saved")
    assert ours.image_encoder is None
    with pytest.raises(ValueError, match="image encoder"):
        ours("x", images=[torch.rand(3, 32, 32)], **STEPS)


def test_reference_preset_matches_a_transcription_of_the_reference_sampler(
    prior_pair: tuple[Any, Any],
) -> None:
    """Stability's reference sampler in plain float math: shifted logSNR, noise_cond, CFG with
    rescale, DDPM as DDIM(η=1), the last x0 handed on."""
    ours = prior_pair[1]
    steps, shift, cfg, rho = 5, 2.0, 4.0, 0.7
    got = ours(
        "a cat", height=128, width=128, preset="reference", num_inference_steps=steps, generator=seeded()
    )

    s = 0.008
    alpha_min = math.cos(s / (1 + s) * math.pi / 2) ** 2

    def logsnr(t: float) -> float:  # the cosine ᾱ clamped to [1e-4, 0.9999], shifted, clamped
        alpha = min(max(math.cos((t + s) / (1 + s) * math.pi / 2) ** 2 / alpha_min, 1e-4), 0.9999)
        return min(max(math.log(alpha / (1 - alpha)) + 2 * math.log(1 / shift), -9.21024), 9.21007)

    def noise_cond(logsnr: float) -> float:
        v = 1 / (1 + math.exp(-logsnr))
        return min(max(math.acos(math.sqrt(v * alpha_min)) / (math.pi / 2) * (1 + s) - s, 0.0), 1.0)

    text = ours.encode_prompt(prompt="a cat", guidance=True)
    image = torch.zeros(1, 1, tiny.IMAGE_WIDTH)
    generator = seeded()
    x = torch.randn(1, 16, 3, 3, generator=generator)
    times = [1 - i / steps for i in range(steps + 1)]
    x0 = x
    for i in range(steps):
        l_now, l_next = logsnr(times[i]), logsnr(times[i + 1])
        r = torch.full((1,), noise_cond(l_now))
        e_c = ours.prior(x, r, text.cond.pooled, text.cond.hidden, image).sample
        e_u = ours.prior(x, r, text.uncond.pooled, text.uncond.hidden, image).sample
        p = e_u + cfg * (e_c - e_u)
        p = rho * p * e_c.std() / (p.std() + 1e-9) + (1 - rho) * p
        a, b = math.sqrt(1 / (1 + math.exp(-l_now))), math.sqrt(1 / (1 + math.exp(l_now)))
        a_prev, b_prev = math.sqrt(1 / (1 + math.exp(-l_next))), math.sqrt(1 / (1 + math.exp(l_next)))
        x0 = (x - b * p) / a
        sigma = math.sqrt(b_prev**2 / b**2) * math.sqrt(1 - a**2 / a_prev**2)
        z = torch.randn(x.shape, generator=generator)
        x = a_prev * x0 + math.sqrt(b_prev**2 - sigma**2) * p + sigma * z
    # Relative to the magnitude: x0 = (x − b·ε)/a divides by a = 0.01 at t = 1, and one float32 ulp
    # of r moves the timestep embedding (r·10000) visibly; a wrong formula is off by O(1).
    torch.testing.assert_close(got.image_embeddings, x0, atol=2e-4 * x0.abs().max().item(), rtol=0)


def test_combined_loads_from_a_decoder_folder_and_a_prior_folder(
    tmp_path: Path, prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any]
) -> None:
    prior_pair[1].save_pretrained(tmp_path / "prior")
    decoder_pair[1].save_pretrained(tmp_path / "decoder")
    combined = StableCascadeCombinedPipeline.from_pretrained(
        tmp_path / "decoder", prior_path_or_repo_id=tmp_path / "prior"
    )
    combined.set_progress_bar_config(disable=True)
    seen: list[str] = []
    images = combined(
        "x",
        height=128,
        width=128,
        prior_num_inference_steps=2,
        num_inference_steps=2,
        output_type="pt",
        prior_callback_on_step_end=lambda *a: seen.append("prior") or {},
        callback_on_step_end=lambda *a: seen.append("decoder") or {},
        generator=seeded(),
    ).images
    embeddings = prior_pair[1]("x", height=128, width=128, num_inference_steps=2, generator=seeded())
    assert seen == ["prior"] * 2 + ["decoder"] * 2
    assert images.shape == (1, 3, 128, 128)
    combined.save_pretrained(tmp_path / "combined")
    again = StableCascadeCombinedPipeline.from_pretrained(tmp_path / "combined")
    assert again.prior_pipe.config.resolution_multiple == 42.67
    torch.testing.assert_close(embeddings.image_embeddings.shape, torch.Size([1, 16, 3, 3]))
