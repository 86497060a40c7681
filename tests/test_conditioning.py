"""Text and image conditioning: parity with diffusers' Stable Cascade prior on identical tiny encoders,
the deliberate differences, truncation warnings and input errors."""

from __future__ import annotations

import copy
import logging
from typing import Any

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadePriorPipeline, StableCascadeUNet
from transformers import CLIPImageProcessor, CLIPTextModelWithProjection, CLIPTokenizer

import tiny
from stable_cascade.conditioning import (
    PromptConditioning,
    TextEmbeddings,
    check_images,
    encode_images,
    encode_prompts,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> CLIPTokenizer:
    return tiny.tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def text_encoder() -> CLIPTextModelWithProjection:
    return tiny.text_encoder(seed=3)


def reference_pipeline(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, feature_extractor: CLIPImageProcessor
) -> StableCascadePriorPipeline:
    return StableCascadePriorPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        prior=StableCascadeUNet(**tiny.TINY_PRIOR.to_dict()),
        scheduler=DDPMWuerstchenScheduler(),
        feature_extractor=feature_extractor,
        image_encoder=tiny.image_encoder(seed=4),
    )


@pytest.fixture(scope="module")
def pipe(tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection) -> StableCascadePriorPipeline:
    return reference_pipeline(tokenizer, text_encoder, tiny.feature_extractor())


def reference(pipe: StableCascadePriorPipeline, n: int, guidance: bool, **inputs: Any) -> tuple[Any, ...]:
    """diffusers' check_inputs + encode_prompt, with the batch size its __call__ derives."""
    prompt = inputs.get("prompt")
    if isinstance(prompt, str):
        batch_size = 1
    elif prompt is not None:
        batch_size = len(prompt)
    else:
        batch_size = inputs["prompt_embeds"].shape[0]
    pipe.check_inputs(**{"prompt": prompt, **inputs})
    return pipe.encode_prompt(
        device=CPU,
        batch_size=batch_size,
        num_images_per_prompt=n,
        do_classifier_free_guidance=guidance,
        **inputs,
    )


def ours(pipe: StableCascadePriorPipeline, n: int, guidance: bool, **inputs: Any) -> PromptConditioning:
    return encode_prompts(
        pipe.tokenizer, pipe.text_encoder, num_images_per_prompt=n, guidance=guidance, device=CPU, **inputs
    )


def assert_same(result: PromptConditioning, expected: tuple[Any, ...], guidance: bool) -> None:
    assert torch.equal(result.cond.hidden, expected[0])
    assert torch.equal(result.cond.pooled, expected[1])
    if guidance:
        assert result.uncond is not None
        assert torch.equal(result.uncond.hidden, expected[2])
        assert torch.equal(result.uncond.pooled, expected[3])
    else:
        assert result.uncond is None


TEXT_CASES = {
    "single": {"prompt": "a cat"},
    "list": {"prompt": ["a cat", "a dog on a hill"]},
    "str-negative": {"prompt": "a cat", "negative_prompt": "blurry"},
    "list-negative": {"prompt": ["a cat", "a dog on a hill"], "negative_prompt": ["blurry", "dark"]},
}


# --- text: parity with diffusers ------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("case", TEXT_CASES)
def test_prompts_match_diffusers(pipe: StableCascadePriorPipeline, case: str, guidance: bool, n: int) -> None:
    inputs = TEXT_CASES[case]
    result = ours(pipe, n, guidance, **inputs)
    assert_same(result, reference(pipe, n, guidance, **inputs), guidance)
    prompts = inputs["prompt"]
    assert result.batch_size == (1 if isinstance(prompts, str) else len(prompts))
    assert result.cond.hidden.shape == (result.batch_size * n, 77, tiny.TEXT_WIDTH)
    assert result.cond.pooled.shape == (result.batch_size * n, 1, tiny.TEXT_WIDTH)


def random_embeddings(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "hidden": torch.randn(batch, 77, tiny.TEXT_WIDTH, generator=g),
        "pooled": torch.randn(batch, 1, tiny.TEXT_WIDTH, generator=g),
    }


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("with_negatives", [True, False])
@pytest.mark.parametrize("guidance", [True, False])
def test_precomputed_embeddings_match_diffusers(
    pipe: StableCascadePriorPipeline, guidance: bool, with_negatives: bool, n: int
) -> None:
    cond, uncond = random_embeddings(2, seed=1), random_embeddings(2, seed=2)
    inputs = {"prompt_embeds": cond["hidden"], "prompt_embeds_pooled": cond["pooled"]}
    if with_negatives:
        inputs |= {
            "negative_prompt_embeds": uncond["hidden"],
            "negative_prompt_embeds_pooled": uncond["pooled"],
        }
    originals = {k: v.clone() for k, v in inputs.items()}
    result = ours(pipe, n, guidance, **inputs)
    assert_same(result, reference(pipe, n, guidance, **inputs), guidance)
    assert result.batch_size == 2
    for key, value in inputs.items():  # the caller's tensors are left alone
        assert torch.equal(value, originals[key])


def test_negative_rows_follow_their_prompt(pipe: StableCascadePriorPipeline) -> None:
    """diffusers repeats negatives with repeat(1, n, 1).view(...): the same order as repeat_interleave."""
    result = ours(pipe, 3, True, prompt=["a cat", "a dog"], negative_prompt=["blurry", "dark"])
    assert result.uncond is not None
    rows = result.uncond.hidden
    assert torch.equal(rows[0], rows[2]) and torch.equal(rows[3], rows[5])
    assert not torch.equal(rows[2], rows[3])
    single = ours(pipe, 1, False, prompt=["blurry", "dark"]).cond.hidden
    assert torch.equal(rows, single.repeat_interleave(3, dim=0))


def test_repeat_puts_copies_in_a_row() -> None:
    embeddings = TextEmbeddings(
        hidden=torch.arange(2.0).view(2, 1, 1).expand(2, 4, 3), pooled=torch.arange(2.0).view(2, 1, 1)
    )
    repeated = embeddings.repeat(3)
    assert repeated.batch_size == 6
    assert repeated.pooled.flatten().tolist() == [0, 0, 0, 1, 1, 1]
    assert repeated.hidden[:, 0, 0].tolist() == [0, 0, 0, 1, 1, 1]


def test_dtype_defaults_to_the_text_encoder(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection
) -> None:
    half = reference_pipeline(
        tokenizer, copy.deepcopy(text_encoder).to(torch.bfloat16), tiny.feature_extractor()
    )
    inputs = {"prompt": ["a cat", "a dog"], "negative_prompt": "blurry"}
    result = ours(half, 2, True, **inputs)
    expected = reference(half, 2, True, prompt=inputs["prompt"], negative_prompt=["blurry", "blurry"])
    assert result.cond.hidden.dtype == torch.bfloat16
    assert_same(result, expected, guidance=True)


def test_explicit_dtype_casts_the_diffusers_result(pipe: StableCascadePriorPipeline) -> None:
    result = ours(pipe, 2, True, prompt="a cat", dtype=torch.bfloat16)
    expected = tuple(t.to(torch.bfloat16) for t in reference(pipe, 2, True, prompt="a cat"))
    assert_same(result, expected, guidance=True)


# --- text: deliberate differences from diffusers ---------------------------------------------------


def test_str_negative_is_used_for_every_prompt(pipe: StableCascadePriorPipeline) -> None:
    """diffusers raises TypeError here; we broadcast, giving what diffusers gives for the spelled-out list."""
    prompts = ["a cat", "a dog", "a cow"]
    result = ours(pipe, 2, True, prompt=prompts, negative_prompt="blurry")
    expected = reference(pipe, 2, True, prompt=prompts, negative_prompt=["blurry"] * 3)
    assert_same(result, expected, guidance=True)


def test_negative_prompt_with_precomputed_embeddings(pipe: StableCascadePriorPipeline) -> None:
    """diffusers raises TypeError here; we encode the negative text as it would be encoded as a prompt."""
    cond = random_embeddings(2, seed=5)
    result = ours(
        pipe,
        2,
        True,
        prompt_embeds=cond["hidden"],
        prompt_embeds_pooled=cond["pooled"],
        negative_prompt=["blurry", "dark"],
    )
    expected = ours(pipe, 2, False, prompt=["blurry", "dark"]).cond
    assert result.uncond is not None
    assert torch.equal(result.uncond.hidden, expected.hidden)
    assert torch.equal(result.uncond.pooled, expected.pooled)


def test_precomputed_embeddings_need_no_encoder_without_guidance() -> None:
    cond = random_embeddings(2, seed=6)
    result = encode_prompts(
        None,
        None,
        prompt_embeds=cond["hidden"].double(),
        prompt_embeds_pooled=cond["pooled"].double(),
        num_images_per_prompt=2,
        guidance=False,
        device=CPU,
    )
    assert result.cond.hidden.dtype == torch.float64  # no encoder: the given dtype is kept
    assert torch.equal(result.cond.hidden, cond["hidden"].double().repeat_interleave(2, dim=0))


# --- text: truncation ----------------------------------------------------------------------------


def test_truncation_names_the_dropped_words(
    pipe: StableCascadePriorPipeline, caplog: pytest.LogCaptureFixture
) -> None:
    kept = "ab " * 37 + "c"  # the tiny tokenizer is per character: 75 tokens, all the room there is
    prompts = ["a cat", kept + " zebra giraffe"]
    with caplog.at_level(logging.WARNING, logger="stable_cascade.conditioning"):
        result = ours(pipe, 1, True, prompt=prompts, negative_prompt=["", kept])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "Prompt 1" in warnings[0] and "'zebra giraffe'" in warnings[0]
    assert_same(result, reference(pipe, 1, True, prompt=prompts, negative_prompt=["", kept]), guidance=True)


# --- text: errors --------------------------------------------------------------------------------

EMB = random_embeddings(2, seed=7)
OTHER = random_embeddings(2, seed=8)
TEXT_ERRORS: list[tuple[dict[str, Any], type[Exception], str]] = [
    ({"prompt": "a", "prompt_embeds": EMB["hidden"]}, ValueError, "both `prompt` and `prompt_embeds`"),
    ({}, ValueError, "neither `prompt` nor `prompt_embeds`"),
    ({"prompt": 3}, TypeError, "`prompt` must be a str or a list of str, got int"),
    ({"prompt": ["a", 3]}, TypeError, r"\(1, 'int'\)"),
    ({"prompt": []}, ValueError, "`prompt` is an empty list"),
    (
        {
            "prompt": "a",
            "negative_prompt": "b",
            "negative_prompt_embeds": EMB["hidden"][:1],
            "negative_prompt_embeds_pooled": EMB["pooled"][:1],
        },
        ValueError,
        "both `negative_prompt` and `negative_prompt_embeds`",
    ),
    ({"prompt_embeds": EMB["hidden"]}, ValueError, "without `prompt_embeds_pooled`"),
    ({"prompt": "a", "prompt_embeds_pooled": EMB["pooled"]}, ValueError, "`prompt_embeds_pooled` was given"),
    (
        {"prompt": ["a", "b"], "negative_prompt_embeds": EMB["hidden"]},
        ValueError,
        "without `negative_prompt_embeds_pooled`",
    ),
    (
        {
            "prompt_embeds": EMB["hidden"],
            "prompt_embeds_pooled": EMB["pooled"],
            "negative_prompt_embeds": OTHER["hidden"][:, :10],
            "negative_prompt_embeds_pooled": OTHER["pooled"],
        },
        ValueError,
        r"`prompt_embeds` has shape \(2, 77, 24\) but `negative_prompt_embeds` has shape \(2, 10, 24\)",
    ),
    (
        {
            "prompt_embeds": EMB["hidden"],
            "prompt_embeds_pooled": EMB["pooled"],
            "negative_prompt_embeds": OTHER["hidden"],
            "negative_prompt_embeds_pooled": OTHER["pooled"][..., :5],
        },
        ValueError,
        "`prompt_embeds_pooled` has shape",
    ),
    (
        {
            "prompt": "a",
            "negative_prompt_embeds": OTHER["hidden"],
            "negative_prompt_embeds_pooled": OTHER["pooled"],
        },
        ValueError,
        "batch size 2 but there are 1 prompts",
    ),
    ({"prompt": ["a", "b"], "negative_prompt": ["c"]}, ValueError, "1 entries but there are 2 prompts"),
    ({"prompt": "a", "negative_prompt": 5}, TypeError, "`negative_prompt` must be a str or a list of str"),
    ({"prompt": "a", "num_images_per_prompt": 0}, ValueError, "at least 1, got 0"),
    ({"prompt": "a", "num_images_per_prompt": 1.5}, TypeError, "must be an int, got float"),
    (
        {"prompt_embeds": EMB["hidden"][0], "prompt_embeds_pooled": EMB["pooled"]},
        ValueError,
        "must be 3-D",
    ),
]


@pytest.mark.parametrize(("inputs", "error", "message"), TEXT_ERRORS)
def test_text_input_errors(
    pipe: StableCascadePriorPipeline, inputs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        encode_prompts(pipe.tokenizer, pipe.text_encoder, guidance=True, device=CPU, **inputs)


def test_missing_encoder_for_the_empty_negative_is_explained() -> None:
    with pytest.raises(ValueError, match="negative prompt needs a tokenizer and a text encoder"):
        encode_prompts(
            None,
            None,
            prompt_embeds=EMB["hidden"],
            prompt_embeds_pooled=EMB["pooled"],
            guidance=True,
            device=CPU,
        )
    with pytest.raises(ValueError, match="tokenizer and text_encoder is None"):
        encode_prompts(None, None, prompt="a cat", guidance=False, device=CPU)


# --- images --------------------------------------------------------------------------------------


def pil_image(seed: int, size: tuple[int, int] = (48, 40)) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def tensor_image(seed: int) -> torch.Tensor:
    return torch.rand(3, 40, 48, generator=torch.Generator().manual_seed(seed))


def reference_images(pipe: StableCascadePriorPipeline, images: list[Any], dtype: torch.dtype) -> torch.Tensor:
    pipe.check_inputs("a", images=images)
    return pipe.encode_image(images, CPU, dtype, batch_size=1, num_images_per_prompt=1)[0]


def our_images(
    pipe: StableCascadePriorPipeline, images: Any, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return encode_images(pipe.feature_extractor, pipe.image_encoder, images, CPU, dtype)


@pytest.mark.parametrize("count", [1, 2])
def test_pil_images_match_diffusers(pipe: StableCascadePriorPipeline, count: int) -> None:
    images = [pil_image(seed) for seed in range(count)]
    result = our_images(pipe, images)
    assert result.shape == (1, count, tiny.IMAGE_WIDTH)
    assert torch.equal(result, reference_images(pipe, images, torch.float32))


def test_tensor_image_matches_diffusers_without_the_second_rescale(
    tokenizer: CLIPTokenizer, text_encoder: CLIPTextModelWithProjection, pipe: StableCascadePriorPipeline
) -> None:
    """diffusers lets the feature extractor divide a [0, 1] tensor by 255; we do not, and otherwise agree."""
    image = tensor_image(1)
    no_rescale = CLIPImageProcessor(
        crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_rescale=False
    )
    fixed = reference_pipeline(tokenizer, text_encoder, no_rescale)
    for given in (image, image[None]):
        assert torch.equal(our_images(pipe, [given]), reference_images(fixed, [image], torch.float32))


def test_tensor_image_agrees_with_the_same_pil_image(pipe: StableCascadePriorPipeline) -> None:
    picture = pil_image(2)
    as_tensor = torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1).float() / 255
    from_pil, from_tensor = our_images(pipe, [picture]), our_images(pipe, [as_tensor])
    diffusers_tensor = reference_images(pipe, [as_tensor], torch.float32)
    ours_error = (from_tensor - from_pil).abs().max()
    assert ours_error < 0.05 * from_pil.abs().max()
    assert ours_error < (diffusers_tensor - from_pil).abs().max()


def test_mixed_images_are_one_token_each(pipe: StableCascadePriorPipeline) -> None:
    picture, image = pil_image(3), tensor_image(4)
    original = image.clone()
    mixed = our_images(pipe, [picture, image], dtype=torch.bfloat16)
    alone = torch.cat([our_images(pipe, [picture]), our_images(pipe, [image])], dim=1)
    assert mixed.dtype == torch.bfloat16
    assert torch.equal(mixed, alone.to(torch.bfloat16))
    assert torch.equal(image, original)


def test_check_images_accepts_one_image_or_a_list() -> None:
    picture, image = pil_image(0), tensor_image(0)
    assert check_images(picture) == [picture]
    assert check_images(image)[0] is image
    assert check_images((picture, image))[1] is image


IMAGE_ERRORS: list[tuple[Any, type[Exception], str]] = [
    ("cat.png", TypeError, "got str"),
    ([], ValueError, "empty list"),
    (
        [pil_image(0), np.zeros((8, 8, 3))],
        TypeError,
        r"`images\[1\]` must be a PIL.Image.Image or a torch.Tensor, got",
    ),
    ([torch.rand(2, 3, 8, 8)], ValueError, r"\(3, H, W\) or \(1, 3, H, W\), got \(2, 3, 8, 8\)"),
    ([torch.rand(4, 8, 8)], ValueError, r"got \(4, 8, 8\)"),
    (
        [torch.zeros(3, 8, 8, dtype=torch.uint8)],
        TypeError,
        "float tensor in \\[0, 1\\], got dtype torch.uint8",
    ),
    ([torch.full((3, 8, 8), 2.0)], ValueError, r"values in \[0, 1\], got \[2, 2\]"),
]


@pytest.mark.parametrize(("images", "error", "message"), IMAGE_ERRORS)
def test_image_input_errors(
    pipe: StableCascadePriorPipeline, images: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        check_images(images)
    if isinstance(images, list):
        with pytest.raises(error, match=message):
            our_images(pipe, images)
