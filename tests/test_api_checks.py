"""The library API checks sizes, steps, tensors and shapes as the CLI does: each mistake stops before
any work with one line saying what was expected (a height of 10⁶ or 10⁹ steps used to run until
killed, ``num_inference_steps=0`` in the combined pipeline silently became the preset's count)."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
    StableCascadeUNet,
)

ONE_STEP = {"num_inference_steps": 1}
TEXT = {"prompt_embeds": torch.randn(1, 77, 24), "prompt_embeds_pooled": torch.randn(1, 1, 24)}
F64 = torch.float64


@pytest.fixture(scope="module")
def pipes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer, text_encoder = tiny.tokenizer(folder), tiny.text_encoder()
    prior = StableCascadePriorPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        prior=tiny.randomize_(StableCascadeUNet(tiny.TINY_PRIOR), 0, scale=0.1),
        scheduler=DDPMWuerstchenScheduler(),
    )
    decoder = StableCascadeDecoderPipeline(
        decoder=tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 1, scale=0.1),
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), 2, scale=0.1),
    )
    combined = StableCascadeCombinedPipeline(
        **decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()}
    )
    for pipe in (prior, decoder, combined):
        pipe.set_progress_bar_config(disable=True)
    return {"prior": prior, "decoder": decoder, "combined": combined, "unet": prior.prior}


@pytest.fixture(autouse=True)
def within_seconds() -> Iterator[None]:
    """A check that is missing must fail the test, not hang it."""

    def stop(*_: Any) -> None:
        raise TimeoutError("no error within 20 s: the call started the work")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(20)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def embeddings(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=dtype)


CASES: list[tuple[str, str, Callable[[Any], Any], type[Exception], str]] = [
    # sizes: the CLI's bounds (multiples of 8, at most 8192 a side and 4096² pixels)
    ("prior", "height 10^6", lambda p: p("x", height=10**6, **ONE_STEP), ValueError, "from 8 to 8192"),
    ("prior", "pixels", lambda p: p("x", height=8192, width=4104, **ONE_STEP), ValueError, "16,777,216"),
    (
        "decoder",
        "height 10^6",
        lambda p: p(embeddings(1, 16, 6, 6), "x", height=10**6, width=64),
        ValueError,
        "8192",
    ),
    (
        "decoder",
        "implied size",
        lambda p: p(embeddings(1, 16, 2, 900), "x", **ONE_STEP),
        ValueError,
        r"the decoded image would be .* more than the limit",
    ),
    (
        "combined",
        "height 10^6",
        lambda p: p("x", height=10**6),
        ValueError,
        "height must be a multiple of 8 from 8",
    ),
    # steps: 1 to 1000, in the combined pipeline too
    ("prior", "10^9 steps", lambda p: p("x", num_inference_steps=10**9), ValueError, "between 1 and 1000"),
    (
        "decoder",
        "10^9 steps",
        lambda p: p(embeddings(1, 16, 6, 6), "x", num_inference_steps=10**9),
        ValueError,
        "1000",
    ),
    (
        "prior",
        "timesteps",
        lambda p: p("x", timesteps=[1 - i / 5000 for i in range(5001)]),
        ValueError,
        "at most 1001",
    ),
    (
        "combined",
        "0 steps",
        lambda p: p("x", num_inference_steps=0),
        ValueError,
        "num_inference_steps must be between 1",
    ),
    (
        "combined",
        "0 prior steps",
        lambda p: p("x", prior_num_inference_steps=0),
        ValueError,
        "prior_num_inference_steps",
    ),
    ("combined", "10^9 steps", lambda p: p("x", prior_num_inference_steps=10**9), ValueError, "1000"),
    ("combined", "2.5 steps", lambda p: p("x", num_inference_steps=2.5), TypeError, "whole number of steps"),
    # tensors: floating point, not empty, of the model's widths
    (
        "prior",
        "int latents",
        lambda p: p("x", latents=torch.zeros(1, 16, 6, 6, dtype=torch.int64)),
        TypeError,
        "floating",
    ),
    ("prior", "list latents", lambda p: p("x", latents=[[0.0]]), TypeError, "latents must be a floating"),
    (
        "prior",
        "empty embeds",
        lambda p: p(prompt_embeds=embeddings(0, 77, 24), prompt_embeds_pooled=embeddings(0, 1, 24)),
        ValueError,
        "is empty",
    ),
    (
        "prior",
        "int embeds",
        lambda p: p(
            prompt_embeds=torch.zeros(1, 77, 24, dtype=torch.int64), prompt_embeds_pooled=embeddings(1, 1, 24)
        ),
        TypeError,
        "floating-point",
    ),
    (
        "prior",
        "embeds width",
        lambda p: p(prompt_embeds=embeddings(1, 77, 32), prompt_embeds_pooled=embeddings(1, 1, 32)),
        ValueError,
        "32 wide but the prior takes 24",
    ),
    (
        "prior",
        "empty image embeds",
        lambda p: p("x", image_embeds=embeddings(1, 0, 16)),
        ValueError,
        r"image_embeds is empty .* \(B, N, 16\)",
    ),
    (
        "prior",
        "image embeds width",
        lambda p: p("x", image_embeds=embeddings(1, 1, 17)),
        ValueError,
        "16 channels",
    ),
    ("prior", "empty image", lambda p: p("x", images=torch.zeros(3, 0, 8)), ValueError, "is empty"),
    ("prior", "10^6 images", lambda p: p("x", num_images_per_prompt=10**6), ValueError, "at most 4,096"),
    (
        "decoder",
        "empty latents",
        lambda p: p(embeddings(0, 16, 6, 6), "x"),
        ValueError,
        r"image_embeddings is empty",
    ),
    ("decoder", "empty list", lambda p: p([], "x"), ValueError, "empty list"),
    (
        "decoder",
        "mixed list",
        lambda p: p([embeddings(1, 16, 6, 6), embeddings(1, 16, 5, 5)], "x"),
        ValueError,
        "of one size",
    ),
    (
        "decoder",
        "numpy",
        lambda p: p(embeddings(1, 16, 6, 6).numpy(), "x"),
        TypeError,
        "must be a torch.Tensor",
    ),
    (
        "decoder",
        "int latents",
        lambda p: p(torch.zeros(1, 16, 6, 6, dtype=torch.long), "x"),
        TypeError,
        "floating-point",
    ),
    (
        "decoder",
        "channels",
        lambda p: p(embeddings(1, 15, 6, 6), "x"),
        ValueError,
        r"\(B, 16, h, w\); got shape \(1, 15, 6, 6\)",
    ),
    (
        "decoder",
        "pooled width",
        lambda p: p(
            embeddings(1, 16, 6, 6),
            prompt_embeds=embeddings(1, 77, 24),
            prompt_embeds_pooled=embeddings(1, 1, 23),
        ),
        ValueError,
        "23 wide but the decoder takes 24",
    ),
    # the UNet itself: float64 or mismatched inputs
    (
        "unet",
        "float64 sample",
        lambda u: u(embeddings(1, 16, 4, 4, dtype=F64), 0.5, embeddings(1, 1, 24), embeddings(1, 7, 24)),
        TypeError,
        "sample is torch.float64 but Stage C .* runs in torch.float32",
    ),
    (
        "unet",
        "float64 text",
        lambda u: u(
            embeddings(1, 16, 4, 4), 0.5, embeddings(1, 1, 24, dtype=F64), embeddings(1, 7, 24, dtype=F64)
        ),
        TypeError,
        "clip_text_pooled is torch.float64",
    ),
    (
        "unet",
        "text width",
        lambda u: u(embeddings(1, 16, 4, 4), 0.5, embeddings(1, 1, 24), embeddings(1, 7, 25)),
        ValueError,
        r"clip_text must be \(B, L, 24\)",
    ),
    (
        "unet",
        "image width",
        lambda u: u(
            embeddings(1, 16, 4, 4), 0.5, embeddings(1, 1, 24), embeddings(1, 7, 24), embeddings(1, 1, 17)
        ),
        ValueError,
        r"clip_img must be \(B, N, 16\)",
    ),
    (
        "unet",
        "empty batch",
        lambda u: u(embeddings(0, 16, 4, 4), 0.5, embeddings(0, 1, 24), embeddings(0, 7, 24)),
        ValueError,
        "B >= 1",
    ),
]


@pytest.mark.parametrize(
    ("target", "name", "call", "error", "message"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_mistakes_stop_before_the_work_with_one_line(
    pipes: dict[str, Any],
    target: str,
    name: str,
    call: Callable[[Any], Any],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message) as info:
        call(pipes[target])
    assert "\n" not in str(info.value)


def test_float64_inputs_are_cast_like_diffusers_casts_embeddings(pipes: dict[str, Any]) -> None:
    """float64 latents, embeddings and images run (cast to the model's dtype) and give the float32 result."""
    prior, decoder = pipes["prior"], pipes["decoder"]
    latents = torch.randn(1, 16, 6, 6, generator=torch.Generator().manual_seed(0))
    run = {"height": 256, "width": 256, "num_inference_steps": 2, "guidance_scale": 1.0}
    image_embeds = torch.randn(1, 1, 16)
    plain = prior(
        **TEXT, latents=latents, image_embeds=image_embeds, generator=torch.Generator().manual_seed(1), **run
    ).image_embeddings
    doubled = prior(
        generator=torch.Generator().manual_seed(1),
        prompt_embeds=TEXT["prompt_embeds"].double(),
        prompt_embeds_pooled=TEXT["prompt_embeds_pooled"].double(),
        latents=latents.double(),
        image_embeds=image_embeds.double(),
        **run,
    ).image_embeddings
    torch.testing.assert_close(doubled, plain)
    decoded = decoder(
        plain.double(), "x", num_inference_steps=1, output_type="pt", generator=torch.Generator()
    )
    assert decoded.images.dtype == torch.float32


def test_generation_bounds_are_shared_with_the_cli() -> None:
    """One set of numbers (``stable_cascade.limits``): jobs refuse what the pipelines refuse."""
    from stable_cascade import limits
    from stable_cascade.engine import Job
    from stable_cascade.pipelines.sizes import check_image_size

    too_wide = limits.MAX_SIDE + limits.SIZE_MULTIPLE
    with pytest.raises(ValueError, match="8192"):
        check_image_size(1024, too_wide)
    with pytest.raises(ValueError, match="8192"):
        Job.create(prompt="x", width=too_wide, height=1024)
    with pytest.raises(ValueError, match=f"between 1 and {limits.MAX_STEPS}"):
        Job.create(prompt="x", prior_steps=limits.MAX_STEPS + 1)


def test_largest_allowed_size_is_accepted_by_the_check() -> None:
    from stable_cascade.pipelines.sizes import check_image_size

    check_image_size(4096, 4096)
    check_image_size(8192, 2048)
    with pytest.raises(ValueError, match="more than the limit"):
        check_image_size(8192, 2056)
