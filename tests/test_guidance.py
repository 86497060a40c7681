"""Classifier-free guidance: diffusers' lerp, the reference's rescale, and the doubled-batch call."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from torch import Tensor

from stable_cascade.diffusion.guidance import classifier_free_guidance
from stable_cascade.diffusion.samplers import ddpm
from stable_cascade.diffusion.timesteps import diffusers_schedule

SHAPE = (2, 3, 4, 4)


class CondModel:
    """A fake ε-model with ``[cond; uncond]`` conditioning for the doubled batch; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Tensor, Tensor]] = []

    def __call__(self, x: Tensor, ratio: Tensor) -> Tensor:
        self.calls.append((x, ratio))
        half = x.shape[0] // 2
        condition = torch.cat([torch.full((half,), 0.7), torch.full((x.shape[0] - half,), -0.4)])
        view = (-1,) + (1,) * (x.ndim - 1)
        return (torch.tanh(x) * 1.3 + condition.view(view) * x + 0.2 * ratio.view(view)).to(x.dtype)


def inputs() -> tuple[Tensor, Tensor]:
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([0.8, 0.8])


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.0])
def test_scale_at_most_one_returns_the_model(scale: float) -> None:
    model = CondModel()
    assert classifier_free_guidance(model, scale) is model
    assert classifier_free_guidance(model, scale, rescale=0.7) is model


def test_one_call_on_the_doubled_batch_and_lerp() -> None:
    model = CondModel()
    x, ratio = inputs()
    got = classifier_free_guidance(model, 4.0)(x, ratio)
    assert len(model.calls) == 1
    doubled_x, doubled_ratio = model.calls[0]
    assert torch.equal(doubled_x, torch.cat([x, x])) and torch.equal(doubled_ratio, torch.cat([ratio, ratio]))
    both = CondModel()(torch.cat([x, x]), torch.cat([ratio, ratio]))
    eps_cond, eps_uncond = both[:2], both[2:]
    assert torch.equal(got, torch.lerp(eps_uncond, eps_cond, 4.0))
    torch.testing.assert_close(got, eps_uncond + 4.0 * (eps_cond - eps_uncond))


@pytest.mark.parametrize("rho", [0.7, 1.0])
def test_rescale_matches_reference_transcription(rho: float) -> None:
    x, ratio = inputs()
    got = classifier_free_guidance(CondModel(), 4.0, rescale=rho)(x, ratio)
    both = CondModel()(torch.cat([x, x]), torch.cat([ratio, ratio])).double().numpy()
    eps_cond, eps_uncond = both[:2], both[2:]
    # Stability's GDF: p = lerp; p = ρ·(p·std(ε_c)/(std(p)+1e-9)) + p·(1−ρ), unbiased std, here per
    # sample (GDF takes it over the whole batch, identical for its batch of one).
    p = eps_uncond + 4.0 * (eps_cond - eps_uncond)
    for i in range(len(p)):
        expected = rho * (p[i] * np.std(eps_cond[i], ddof=1) / (np.std(p[i], ddof=1) + 1e-9)) + p[i] * (
            1 - rho
        )
        torch.testing.assert_close(got[i].double(), torch.from_numpy(expected), rtol=1e-5, atol=1e-6)
        if rho == 1.0:  # full rescale restores the conditional prediction's spread
            assert got[i].std().item() == pytest.approx(np.std(eps_cond[i], ddof=1), rel=1e-5)


def test_rescale_keeps_the_images_of_a_batch_independent() -> None:
    x, ratio = inputs()
    guided = classifier_free_guidance(CondModel(), 4.0, rescale=0.7)
    together = guided(x, ratio)
    for i in range(len(x)):
        torch.testing.assert_close(together[i : i + 1], guided(x[i : i + 1], ratio[i : i + 1]))


def test_rejects_bad_rescale() -> None:
    for rho in (-0.1, 1.5):
        with pytest.raises(ValueError, match="rescale"):
            classifier_free_guidance(CondModel(), 4.0, rescale=rho)


def test_guided_ddpm_bit_identical_to_diffusers_pipeline_loop() -> None:
    """The prior pipeline's CFG loop: model on cat([x]*2), lerp(uncond, cond, scale), scheduler.step."""
    model, scale = CondModel(), 4.0
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    scheduler = diffusers.DDPMWuerstchenScheduler()
    scheduler.set_timesteps(10)
    theirs, generator = x, torch.Generator().manual_seed(2)
    for t in scheduler.timesteps[:-1]:
        ratio = t.expand(SHAPE[0]).to(x.dtype)
        eps_text, eps_uncond = model(torch.cat([theirs] * 2), torch.cat([ratio] * 2)).chunk(2)
        eps = torch.lerp(eps_uncond, eps_text, scale)
        theirs = scheduler.step(eps, ratio, theirs, generator=generator).prev_sample
    guided = classifier_free_guidance(model, scale)
    ours = ddpm(guided, x, diffusers_schedule(10), generator=torch.Generator().manual_seed(2)).sample
    assert torch.equal(ours, theirs)
