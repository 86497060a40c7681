"""Issue 29: a sampling step is the UNet call and the arithmetic on x, nothing else; the schedule is
computed once per run; pipelines' phases can be timed by name, at no cost when nobody records."""

from __future__ import annotations

import collections
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from stable_cascade import (
    DDPMWuerstchenScheduler,
    PaellaVQModel,
    SchedulerConfig,
    StableCascadeDecoderPipeline,
    StableCascadeUNet,
    StageSettings,
)
from stable_cascade.diffusion import cosine, timesteps
from stable_cascade.sampling import phases
from stable_cascade.sampling.loop import run_stage

SAMPLERS = ("ddpm", "ddim", "euler_ancestral", "dpmpp_2m", "lcm")
#: (op, creates a tensor from nothing, touches only tensors smaller than the latents)
Op = tuple[str, bool, bool]


class LoopOps(TorchDispatchMode):
    """The aten ops run between the sampler's first step and its end, outside the UNet's forward."""

    def __init__(self, latent_numel: int) -> None:
        super().__init__()
        self.latent_numel = latent_numel
        self.ops: collections.Counter[Op] = collections.Counter()
        self.in_loop = False
        self.in_unet = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.in_loop and not self.in_unet:
            inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            outputs = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
            small = max(t.numel() for t in (*inputs, *outputs)) < self.latent_numel
            self.ops[str(func.overloadpacket), not inputs, small] += 1
        return out

    def progress(self, indices: Iterable[int]) -> Iterator[int]:
        self.in_loop = True
        yield from indices
        self.in_loop = False


def decoder_unet() -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(tiny.TINY_DECODER), 0, scale=0.1)


def stage_b_inputs() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cond = {"clip_text_pooled": torch.randn(1, 1, tiny.TEXT_WIDTH, generator=g)}
    cond["effnet"] = torch.randn(1, 16, 4, 4, generator=g)
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    return cond, uncond, torch.randn(1, 4, 16, 16, generator=g)


def loop_ops(
    unet: StableCascadeUNet, monkeypatch: pytest.MonkeyPatch, settings: StageSettings
) -> collections.Counter[Op]:
    cond, uncond, x = stage_b_inputs()
    log = LoopOps(x.numel())
    forward = unet.forward

    def unet_forward(*args: Any, **kwargs: Any) -> Any:
        log.in_unet += 1
        try:
            return forward(*args, **kwargs)
        finally:
            log.in_unet -= 1

    monkeypatch.setattr(unet, "forward", unet_forward)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad(), log:
        run_stage(unet, cond, uncond, x, settings, SchedulerConfig(), generator, progress=log.progress)
    return log.ops


@pytest.mark.parametrize("guidance", [1.0, 4.0])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_a_step_is_the_unet_call_and_the_arithmetic_on_x(
    monkeypatch: pytest.MonkeyPatch, sampler: str, guidance: float
) -> None:
    unet = decoder_unet()
    few = loop_ops(unet, monkeypatch, StageSettings(3, guidance, sampler=sampler))
    many = loop_ops(unet, monkeypatch, StageSettings(9, guidance, sampler=sampler))
    extra = collections.Counter(many)
    extra.subtract(few)
    assert all(n >= 0 and n % 6 == 0 for n in extra.values()), extra  # six more steps: six times one step
    # In the loop, nothing is made from nothing but the steps' noise, and nothing is computed on
    # schedule-sized tensors alone (the schedule's share of a step is computed before the loop),
    # except, with guidance, each step's ratio doubled for the [cond; uncond] batch.
    ops = few + many
    made = {op for op, creates, _ in ops if creates}
    assert made <= {"aten.randn"}, made
    small = {op for op, creates, only_small in ops if only_small and not creates}
    assert small <= ({"aten.cat"} if guidance > 1 else set()), small


@pytest.mark.parametrize("schedule", ["diffusers", "reference"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_the_schedule_is_computed_once_per_run(
    monkeypatch: pytest.MonkeyPatch, sampler: str, schedule: str
) -> None:
    calls = collections.Counter[str]()
    for module in (cosine, timesteps):
        for name in ("alpha_cumprod", "noise_cond", "logsnr", "reference_timesteps"):
            if hasattr(module, name):
                original = getattr(module, name)

                def counted(*args: Any, _name: str = name, _original: Any = original, **kwargs: Any) -> Any:
                    calls[_name] += 1
                    return _original(*args, **kwargs)

                monkeypatch.setattr(module, name, counted)
    unet = decoder_unet()
    cond, _, x = stage_b_inputs()
    counts = []
    for steps in (3, 9):
        calls.clear()
        settings = StageSettings(steps, 1.0, sampler=sampler, schedule=schedule)  # type: ignore[arg-type]
        with torch.no_grad():
            run_stage(unet, cond, None, x, settings, SchedulerConfig(), torch.Generator().manual_seed(0))
        counts.append(dict(calls))
    assert counts[0] == counts[1]


def test_phases_cost_nothing_unless_recorded() -> None:
    def progress(indices: Iterable[int]) -> Iterable[int]:
        return indices

    assert phases.phase("Stage B set-up") is phases.phase("Stage A decode")  # one shared null context
    assert phases.timed_steps("Stage B", progress) is progress
    assert phases.timed_steps("Stage B", None) is None
    with phases.record_phases() as recorder:
        assert phases.phase("x") is not phases.phase("x")
        with phases.phase("x"):
            pass
        assert list(phases.timed_steps("Stage C", None)(range(2))) == [0, 1]  # type: ignore[misc]
    assert [name for name, _ in recorder.records] == ["x", "Stage C step 1", "Stage C step 2"]
    assert phases.timed_steps("Stage B", None) is None  # off again after the block


def test_a_decoder_call_is_timed_by_phase(tmp_path: Path) -> None:
    pipe = StableCascadeDecoderPipeline(
        decoder=decoder_unet(),
        tokenizer=tiny.tokenizer(tmp_path / "tokenizer"),
        text_encoder=tiny.text_encoder(),
        scheduler=DDPMWuerstchenScheduler(),
        vqgan=tiny.randomize_(PaellaVQModel(tiny.TINY_VQGAN), 2, scale=0.1),
    )
    pipe.set_progress_bar_config(disable=True)
    embeddings = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0))
    with phases.record_phases() as recorder:
        pipe(embeddings, "a red circle", num_inference_steps=2, output_type="np")
    assert list(recorder.totals()) == [
        "Stage B text encoding",
        "Stage B set-up",
        "Stage B step 1",
        "Stage B step 2",
        "Stage B NaN check",
        "Stage A decode",
        "output conversion (np)",
    ]
    assert all(seconds >= 0 for seconds in recorder.totals().values())
