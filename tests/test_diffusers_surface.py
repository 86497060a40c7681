"""diffusers' public pipeline surface beyond ``__call__``: ``from_pipe``, ``check_inputs``,
``prepare_latents`` and ``_optional_components``, with the same signatures and behaviour as diffusers'
own classes on identical tiny random weights."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers
import pytest
import torch

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    StableCascadeCombinedPipeline,
    StableCascadeDecoderPipeline,
    StableCascadePriorPipeline,
)

PAIRS = [
    (StableCascadePriorPipeline, diffusers.StableCascadePriorPipeline),
    (StableCascadeDecoderPipeline, diffusers.StableCascadeDecoderPipeline),
    (StableCascadeCombinedPipeline, diffusers.StableCascadeCombinedPipeline),
]
IDS = ["prior", "decoder", "combined"]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def prior_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StableCascadePriorPipeline]:
    return tiny.diffusers_and_ours(tmp_path_factory.mktemp("prior"), "prior")


@pytest.fixture(scope="module")
def decoder_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, StableCascadeDecoderPipeline]:
    return tiny.diffusers_and_ours(tmp_path_factory.mktemp("decoder"), "decoder")


# -- signatures and class attributes ----------------------------------------------------------------


def positional(function: Callable[..., Any]) -> list[str]:
    """The parameter names a caller may pass by position, in order (ours may add keyword-only ones)."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_the_public_methods_have_diffusers_signatures(ours: type, theirs: type) -> None:
    for name in ("check_inputs", "prepare_latents", "from_pipe"):
        if hasattr(theirs, name):
            assert hasattr(ours, name), name
            assert positional(getattr(ours, name)) == positional(getattr(theirs, name)), name
            defaults = {
                k: p.default
                for k, p in inspect.signature(getattr(theirs, name)).parameters.items()
                if p.default is not inspect.Parameter.empty
            }
            ours_parameters = inspect.signature(getattr(ours, name)).parameters
            assert {k: ours_parameters[k].default for k in defaults} == defaults, name


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=IDS)
def test_optional_components_cover_diffusers(ours: type, theirs: type) -> None:
    assert set(theirs._optional_components) <= set(ours._optional_components)
    # every optional component may be None in the constructor, as diffusers requires of the list
    parameters = inspect.signature(ours.__init__).parameters
    assert all(parameters[name].default is None for name in ours._optional_components)


# -- check_inputs ------------------------------------------------------------------------------------

EMBEDS = torch.zeros(1, 77, tiny.TEXT_WIDTH)
POOLED = torch.zeros(1, 1, tiny.TEXT_WIDTH)

PRIOR_INPUTS: list[dict[str, Any]] = [
    {"prompt": "a cat"},
    {"prompt": ["a cat", "a dog"], "negative_prompt": "blurry"},
    {"prompt": None, "prompt_embeds": EMBEDS, "prompt_embeds_pooled": POOLED},
    {"prompt": "a cat", "images": [torch.rand(3, 8, 8)]},
    {"prompt": "a cat", "callback_on_step_end_tensor_inputs": ["latents", "text_encoder_hidden_states"]},
    # mistakes diffusers refuses too
    {"prompt": None},
    {"prompt": "a cat", "prompt_embeds": EMBEDS, "prompt_embeds_pooled": POOLED},
    {"prompt": 3},
    {"prompt": "a cat", "negative_prompt": "x", "negative_prompt_embeds": EMBEDS},
    {"prompt": None, "prompt_embeds": EMBEDS},
    {
        "prompt": None,
        "prompt_embeds": EMBEDS,
        "prompt_embeds_pooled": POOLED,
        "negative_prompt_embeds": torch.zeros(1, 7, tiny.TEXT_WIDTH),
        "negative_prompt_embeds_pooled": POOLED,
    },
    {"prompt": "a cat", "images": [torch.rand(3, 8, 8)], "image_embeds": torch.zeros(1, 1, 16)},
    {"prompt": "a cat", "images": ["not an image"]},
    {"prompt": "a cat", "callback_on_step_end_tensor_inputs": ["x0"]},
]

DECODER_INPUTS: list[dict[str, Any]] = [
    {"prompt": "a cat"},
    {"prompt": None, "prompt_embeds": EMBEDS},
    {"prompt": "a cat", "callback_on_step_end_tensor_inputs": ["latents", "image_embeddings"]},
    {"prompt": None},
    {"prompt": "a cat", "prompt_embeds": EMBEDS},
    {"prompt": 3},
    {"prompt": "a cat", "negative_prompt": "x", "negative_prompt_embeds": EMBEDS},
    {"prompt": None, "prompt_embeds": EMBEDS, "negative_prompt_embeds": torch.zeros(1, 7, tiny.TEXT_WIDTH)},
    {"prompt": "a cat", "callback_on_step_end_tensor_inputs": ["text_encoder_hidden_states"]},
]


def raises(call: Callable[[], Any]) -> bool:
    try:
        call()
    except (ValueError, TypeError):
        return True
    return False


@pytest.mark.parametrize("arguments", PRIOR_INPUTS)
def test_prior_check_inputs_accepts_and_refuses_what_diffusers_does(
    prior_pair: tuple[Any, Any], arguments: dict[str, Any]
) -> None:
    reference, ours = prior_pair
    assert raises(lambda: ours.check_inputs(**arguments)) == raises(
        lambda: reference.check_inputs(**arguments)
    )


@pytest.mark.parametrize("arguments", DECODER_INPUTS)
def test_decoder_check_inputs_accepts_and_refuses_what_diffusers_does(
    decoder_pair: tuple[Any, Any], arguments: dict[str, Any]
) -> None:
    reference, ours = decoder_pair
    assert raises(lambda: ours.check_inputs(**arguments)) == raises(
        lambda: reference.check_inputs(**arguments)
    )


# -- prepare_latents ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "height", "width", "per_prompt"), [(1, 256, 256, 1), (2, 128, 344, 3)])
def test_prior_prepare_latents_draws_what_diffusers_draws(
    prior_pair: tuple[Any, Any], batch: int, height: int, width: int, per_prompt: int
) -> None:
    reference, ours = prior_pair
    arguments = (batch, height, width, per_prompt, torch.float32, "cpu")
    expected = reference.prepare_latents(*arguments, seeded(), None, reference.scheduler)
    got = ours.prepare_latents(*arguments, seeded(), None, ours.scheduler)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    given = torch.randn(expected.shape)
    torch.testing.assert_close(ours.prepare_latents(*arguments, None, given, ours.scheduler), given)
    with pytest.raises(ValueError, match="shape"):
        ours.prepare_latents(*arguments, None, torch.randn(1, 16, 3, 3), ours.scheduler)


def test_decoder_prepare_latents_draws_what_diffusers_draws(decoder_pair: tuple[Any, Any]) -> None:
    reference, ours = decoder_pair
    embeddings = torch.randn(2, 16, 6, 6)
    expected = reference.prepare_latents(
        2, embeddings, 2, torch.float32, "cpu", seeded(), None, reference.scheduler
    )
    got = ours.prepare_latents(2, embeddings, 2, torch.float32, "cpu", seeded(), None, ours.scheduler)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    sized = ours.prepare_latents(
        1, embeddings, 1, torch.float32, "cpu", None, None, ours.scheduler, image_size=(96, 80)
    )
    assert sized.shape == (1, 4, 24, 20)  # the requested image size / 4: exact output sizes
    with pytest.raises(ValueError, match="shape"):
        ours.prepare_latents(
            1, embeddings, 1, torch.float32, "cpu", None, torch.randn(1, 4, 3, 3), ours.scheduler
        )


# -- from_pipe ---------------------------------------------------------------------------------------


def test_from_pipe_shares_the_models_and_gives_the_same_images(prior_pair: tuple[Any, Any]) -> None:
    _, ours = prior_pair
    again = StableCascadePriorPipeline.from_pipe(ours)
    assert type(again) is StableCascadePriorPipeline
    for name, component in ours.components.items():
        assert getattr(again, name) is component, name
    assert dict(again.config) == dict(ours.config) and again.name_or_path == ours.name_or_path
    run = {"prompt": "a cat", "num_inference_steps": 2, "height": 128, "width": 128}
    torch.testing.assert_close(
        again(**run, generator=seeded()).image_embeddings, ours(**run, generator=seeded()).image_embeddings
    )


def test_from_pipe_takes_replacements_and_config_values(prior_pair: tuple[Any, Any]) -> None:
    reference, ours = prior_pair
    scheduler = DDPMWuerstchenScheduler(s=0.01)
    replaced = StableCascadePriorPipeline.from_pipe(ours, scheduler=scheduler, resolution_multiple=32.0)
    assert replaced.scheduler is scheduler and replaced.config.resolution_multiple == 32.0
    assert replaced.prior is ours.prior and ours.scheduler is not scheduler
    theirs = type(reference).from_pipe(reference, resolution_multiple=32.0)
    assert theirs.config.resolution_multiple == 32.0  # the same keyword means the same in diffusers
    with pytest.raises(TypeError, match="from_pipe got unexpected argument"):
        StableCascadePriorPipeline.from_pipe(ours, not_a_component=1)


def test_from_pipe_needs_the_required_components_as_diffusers(
    prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any]
) -> None:
    with pytest.raises(ValueError):
        diffusers.StableCascadeDecoderPipeline.from_pipe(prior_pair[0])
    with pytest.raises(ValueError, match=r"StableCascadeDecoderPipeline.from_pipe needs decoder, vqgan"):
        StableCascadeDecoderPipeline.from_pipe(prior_pair[1])
    ours = decoder_pair[1]
    built = StableCascadeDecoderPipeline.from_pipe(prior_pair[1], decoder=ours.decoder, vqgan=ours.vqgan)
    assert built.text_encoder is prior_pair[1].text_encoder and built.decoder is ours.decoder


def test_from_pipe_casts_with_torch_dtype(tmp_path: Path) -> None:
    source = StableCascadeDecoderPipeline.from_pipe(
        StableCascadePriorPipeline(
            tokenizer=tiny.tokenizer(tmp_path / "tok"),
            text_encoder=tiny.text_encoder(),
            prior=our_unet(),
            scheduler=DDPMWuerstchenScheduler(),
        ),
        decoder=our_unet(decoder=True),
        vqgan=tiny_vqgan(),
    )
    assert source.dtype == torch.float32  # kept: no dtype given
    cast = StableCascadeDecoderPipeline.from_pipe(source, torch_dtype=torch.bfloat16)
    assert cast.decoder.dtype == torch.bfloat16 and cast.decoder is source.decoder


def test_combined_from_pipe(prior_pair: tuple[Any, Any], decoder_pair: tuple[Any, Any]) -> None:
    prior, decoder = prior_pair[1], decoder_pair[1]
    combined = StableCascadeCombinedPipeline(
        **decoder.components, **{f"prior_{k}": v for k, v in prior.components.items()}
    )
    again = StableCascadeCombinedPipeline.from_pipe(combined)
    assert again.prior_pipe.prior is prior.prior and again.decoder_pipe.decoder is decoder.decoder


def our_unet(decoder: bool = False) -> Any:
    from stable_cascade import StableCascadeUNet

    return StableCascadeUNet(tiny.TINY_DECODER if decoder else tiny.TINY_PRIOR)


def tiny_vqgan() -> Any:
    from stable_cascade import PaellaVQModel

    return PaellaVQModel(tiny.TINY_VQGAN)
