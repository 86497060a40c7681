"""DDPMWuerstchenScheduler against diffusers' own: bit-identical steps, draws and config files."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import diffusers
import pytest
import torch

from stable_cascade.diffusion.cosine import alpha_cumprod
from stable_cascade.diffusion.ddpm_scheduler import DDPMWuerstchenScheduler
from stable_cascade.diffusion.noise import randn
from stable_cascade.specs import SchedulerConfig

SHAPE = (2, 4, 6, 6)


def fake_eps(sample: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed stand-in for the network: depends on the sample and the timestep."""
    return (torch.tanh(sample) * 0.8 + 0.3 * t.view(-1, 1, 1, 1)).to(sample.dtype)


def generators(seeds: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed) for seed in seeds]


def run_loop(
    scheduler: DDPMWuerstchenScheduler | diffusers.DDPMWuerstchenScheduler,
    generator: torch.Generator | list[torch.Generator],
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """The pipelines' loop: timesteps[:-1], timestep expanded to the batch in the model dtype."""
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(7)).to(dtype)
    history = []
    for t in scheduler.timesteps[:-1]:
        ratio = t.expand(SHAPE[0]).to(dtype)
        sample = scheduler.step(fake_eps(sample, ratio), ratio, sample, generator=generator).prev_sample
        history.append(sample)
    return history


def pair(**config: float) -> tuple[DDPMWuerstchenScheduler, diffusers.DDPMWuerstchenScheduler]:
    return DDPMWuerstchenScheduler(**config), diffusers.DDPMWuerstchenScheduler(**config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("scaler", [1.0, 2.0, 0.5])
def test_loop_parity_one_generator(scaler: float, dtype: torch.dtype) -> None:
    ours, theirs = pair(scaler=scaler)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    ours_gen, theirs_gen = generators([0])[0], generators([0])[0]
    got, expected = run_loop(ours, ours_gen, dtype), run_loop(theirs, theirs_gen, dtype)
    assert len(got) == 10
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a.dtype == dtype
        assert torch.equal(a, b), f"step {step} differs"
    # Same number of draws, including the unused one of the last step.
    assert torch.equal(ours_gen.get_state(), theirs_gen.get_state())


def test_loop_parity_generator_list() -> None:
    ours, theirs = pair()
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    got, expected = run_loop(ours, generators([3, 4])), run_loop(theirs, generators([3, 4]))
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
    # Batch item i is driven by generator i alone: swapping seeds swaps the noise.
    swapped = run_loop(ours, generators([4, 3]))
    assert not torch.equal(swapped[0], got[0])


def test_last_step_adds_no_noise() -> None:
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[-2].expand(SHAPE[0])
    assert torch.equal(scheduler.previous_timestep(t), torch.zeros(SHAPE[0]))
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1))
    eps = fake_eps(sample, t)
    a, b = (scheduler.step(eps, t, sample, generator=g).prev_sample for g in generators([0, 1]))
    assert torch.equal(a, b)
    alpha_t, alpha_prev = alpha_cumprod(t[0]), alpha_cumprod(0.0)
    alpha = alpha_t / alpha_prev
    mean = (sample - (1 - alpha) * eps / (1 - alpha_t).sqrt()) / alpha.sqrt()
    torch.testing.assert_close(a, mean)
    # An earlier step does add noise: different seeds, different results.
    t = scheduler.timesteps[-3].expand(SHAPE[0])
    a, b = (scheduler.step(eps, t, sample, generator=g).prev_sample for g in generators([0, 1]))
    assert not torch.allclose(a, b)


@pytest.mark.parametrize("timesteps", [[1.0, 0.7, 0.4, 0.15, 0.0], torch.tensor([0.8, 0.5, 0.25, 0.1])])
def test_custom_timesteps_parity(timesteps: list[float] | torch.Tensor) -> None:
    ours, theirs = pair()
    ours.set_timesteps(timesteps=timesteps)
    theirs.set_timesteps(timesteps=timesteps)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    got, expected = run_loop(ours, generators([5])[0]), run_loop(theirs, generators([5])[0])
    assert len(got) == len(timesteps) - 1
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)


def test_scalar_timestep_and_tuple_output() -> None:
    scheduler = DDPMWuerstchenScheduler()
    scheduler.set_timesteps(4)
    sample = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    t = scheduler.timesteps[1]
    eps = fake_eps(sample, t.expand(SHAPE[0]))
    batched = scheduler.step(eps, t.expand(SHAPE[0]), sample, generators([9])[0]).prev_sample
    (scalar,) = scheduler.step(eps, t, sample, generators([9])[0], return_dict=False)
    assert torch.equal(batched, scalar)
    assert scheduler.previous_timestep(t).shape == ()
    assert scheduler.previous_timestep(t).item() == scheduler.timesteps[2].item()


@pytest.mark.parametrize("timesteps", [torch.tensor([0.9, 0.3]), torch.tensor([0.6])])
def test_add_noise_parity(timesteps: torch.Tensor) -> None:
    ours, theirs = pair(scaler=1.5)
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(4))
    got = ours.add_noise(x0, noise, timesteps)
    assert torch.equal(got, theirs.add_noise(x0, noise, timesteps))
    assert not torch.equal(got, x0)
    half = ours.add_noise(x0.bfloat16(), noise.bfloat16(), timesteps)
    assert half.dtype == torch.bfloat16


def test_scale_model_input_and_sigma() -> None:
    scheduler = DDPMWuerstchenScheduler()
    sample = torch.randn(SHAPE)
    assert scheduler.scale_model_input(sample, torch.tensor(0.5)) is sample
    assert scheduler.init_noise_sigma == 1.0


def test_our_config_read_by_diffusers(tmp_path: Path) -> None:
    DDPMWuerstchenScheduler(scaler=1.5, s=0.01).save_pretrained(tmp_path)
    data = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert data["_class_name"] == "DDPMWuerstchenScheduler"
    loaded = diffusers.DDPMWuerstchenScheduler.from_pretrained(tmp_path)
    assert (loaded.config.scaler, loaded.config.s) == (1.5, 0.01)


def test_diffusers_config_read_by_us(tmp_path: Path) -> None:
    diffusers.DDPMWuerstchenScheduler(scaler=0.5, s=0.02).save_pretrained(tmp_path)
    loaded = DDPMWuerstchenScheduler.from_pretrained(tmp_path)
    assert loaded.config == SchedulerConfig(scaler=0.5, s=0.02)
    assert DDPMWuerstchenScheduler.from_config(loaded.config, s=0.03).config.s == 0.03
    assert DDPMWuerstchenScheduler({"scaler": 2.0}).config.scaler == 2.0


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, ValueError),
        ({"num_inference_steps": 4, "timesteps": [1.0, 0.0]}, ValueError),
        ({"num_inference_steps": 0}, ValueError),
        ({"num_inference_steps": 2.0}, TypeError),
        ({"timesteps": [0.0, 0.5, 1.0]}, ValueError),
        ({"timesteps": [1.0, 0.5, 0.5]}, ValueError),
        ({"timesteps": [1.5, 0.5, 0.0]}, ValueError),
        ({"timesteps": [1.0, 0.5, -0.1]}, ValueError),
        ({"timesteps": [1.0]}, ValueError),
    ],
)
def test_set_timesteps_rejects_bad_arguments(kwargs: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        DDPMWuerstchenScheduler().set_timesteps(**kwargs)  # type: ignore[arg-type]


def test_step_rejects_bad_arguments() -> None:
    scheduler = DDPMWuerstchenScheduler()
    sample = torch.randn(SHAPE)
    with pytest.raises(RuntimeError, match="set_timesteps"):
        scheduler.step(sample, torch.tensor(1.0), sample)
    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match=r"one torch\.Generator per batch item"):
        scheduler.step(sample, torch.tensor(1.0), sample, generator=generators([0, 1, 2]))
    with pytest.raises(ValueError, match="batch size"):
        scheduler.step(sample, torch.ones(3), sample)


def test_randn_matches_diffusers() -> None:
    from diffusers.utils.torch_utils import randn_tensor

    for seeds in ([0], [1, 2]):
        gens = generators(seeds)
        arg = gens if len(seeds) > 1 else gens[0]
        expected = randn_tensor((len(seeds), 3, 5), generator=arg, dtype=torch.float16)
        gens = generators(seeds)
        arg = gens if len(seeds) > 1 else gens[0]
        assert torch.equal(randn((len(seeds), 3, 5), arg, dtype=torch.float16), expected)
    with pytest.raises(ValueError, match=r"one torch\.Generator per batch item"):
        randn((3, 5), generators([0]))
    with pytest.raises(ValueError):
        randn((), generators([0]))


def test_randn_cpu_generator_draws_on_cpu_then_moves() -> None:
    generator = torch.Generator().manual_seed(0)
    moved = randn((2, 3), generator, device="meta")
    assert moved.device.type == "meta" and moved.shape == (2, 3)
    # The draw happened on the CPU generator: it advanced exactly as a CPU draw advances it.
    reference = torch.Generator().manual_seed(0)
    torch.randn((2, 3), generator=reference)
    assert torch.equal(generator.get_state(), reference.get_state())
