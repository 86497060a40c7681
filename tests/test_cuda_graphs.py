"""Issue 19: CUDA-graph replay of the denoising step, its bookkeeping checked on a CPU with a fake graph."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
import torch

import tiny
from stable_cascade import SchedulerConfig, StableCascadeUNet, StageSettings
from stable_cascade.nn.cuda_graphs import GraphedFunction, capturing
from stable_cascade.nn.layers import KeyValue
from stable_cascade.sampling.loop import run_stage
from stable_cascade.specs import UNET_VARIANTS

PRIOR = UNET_VARIANTS["tiny_prior"]
DECODER = UNET_VARIANTS["tiny_decoder"]


class ReplayingGraph:
    """A CPU stand-in for ``torch.cuda.CUDAGraph``: ``capture`` runs the function on the static
    buffers (recording it), ``replay`` runs it again and writes into the same output buffer, so a
    result is right only if the inputs really were copied into the buffers the capture saw."""

    made: ClassVar[list[ReplayingGraph]] = []

    def __init__(self, device: torch.device) -> None:
        self.fn: Callable[[], torch.Tensor] | None = None
        self.output = torch.empty(0)
        self.replays = 0
        ReplayingGraph.made.append(self)

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        assert capturing()
        self.fn, self.output = fn, fn()
        return self.output

    def replay(self) -> None:
        assert self.fn is not None
        self.replays += 1
        self.output.copy_(self.fn())


def unet(config: Any = PRIOR, seed: int = 0) -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(config), seed, scale=0.1).eval()  # type: ignore[return-value]


def conditioning(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "clip_text": torch.randn(batch, 7, PRIOR.clip_text_in_channels or 0, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, PRIOR.clip_text_pooled_in_channels, generator=g),
        "clip_img": torch.randn(batch, 1, PRIOR.clip_image_in_channels or 0, generator=g),
    }


def test_replayed_unet_steps_equal_eager_and_recapture_only_on_a_new_shape() -> None:
    model = unet()
    eager = unet()
    model.enable_cuda_graphs(ReplayingGraph)
    assert model.cuda_graphs is not None
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for batch, size, seed in [
            (2, (4, 4), 1),
            (2, (4, 4), 2),
            (3, (4, 4), 3),
            (2, (6, 4), 4),
            (2, (4, 4), 5),
        ]:
            cond = conditioning(batch, seed)
            cache, reference_cache = model.prepare(size, **cond), eager.prepare(size, **cond)
            for ratio in (0.9, 0.3):  # several steps on one cache
                x = torch.randn(batch, 16, *size, generator=g)
                got = model(x, ratio, cache=cache).sample
                assert torch.equal(got, eager(x, ratio, cache=reference_cache).sample)
    # (2, 4x4) captured once for three generations; batch 3 and size 6x4 each once more.
    assert model.cuda_graphs.captures == 3


def test_outputs_are_copies_and_an_invariant_cache_changed_in_place_is_copied_again() -> None:
    model = unet()
    model.enable_cuda_graphs(ReplayingGraph)
    with torch.no_grad():
        cache = model.prepare((4, 4), **conditioning(2, 1))
        x = torch.randn(2, 16, 4, 4)
        first = model(x, 0.5, cache=cache).sample
        kept = first.clone()
        model(torch.randn(2, 16, 4, 4), 0.7, cache=cache)
        assert torch.equal(first, kept)  # a copy: not overwritten by the next replay
        clip = next(s for level in cache.down for s in level if isinstance(s, KeyValue))
        clip.key.mul_(2)  # changed in place: its version counter moves, so it is copied again
        got = model(x, 0.5, cache=cache).sample
        model.disable_cuda_graphs()
        assert torch.equal(got, model(x, 0.5, cache=cache).sample)
        assert not torch.equal(got, first)


def test_graphed_function_view_and_structure_errors() -> None:
    calls = []

    def double(x: torch.Tensor, pair: tuple[torch.Tensor, int]) -> torch.Tensor:
        calls.append(pair[1])
        return x * 2 + pair[0] * pair[1]

    graphed = GraphedFunction(double, ReplayingGraph, copy_output=False, max_graphs=1)
    one = graphed(torch.ones(3), (torch.ones(3), 1))
    assert torch.equal(one, torch.full((3,), 3.0))
    again = graphed(torch.zeros(3), (torch.ones(3), 1))
    assert again is one and torch.equal(one, torch.ones(3))  # the static output itself
    graphed(torch.zeros(3), (torch.ones(3), 2))  # a plain value is part of the key: new graph
    assert graphed.captures == 2 and len(graphed.graphs) == 1  # the older one was dropped
    with pytest.raises(TypeError, match="got object"):
        graphed(torch.zeros(3), (object(), 1))


def test_guided_sampling_loop_replays_one_graph_per_stage_and_equals_eager() -> None:
    model, eager = unet(), unet()
    model.enable_cuda_graphs(ReplayingGraph)
    settings = StageSettings(4, 4.0, rescale=0.7)
    x = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for seed in (1, 2):  # a second generation with other prompts: no new capture
            cond, uncond = conditioning(1, seed), conditioning(1, seed + 10)
            got = run_stage(model, cond, uncond, x, settings, SchedulerConfig(), torch.Generator())
            expected = run_stage(eager, cond, uncond, x, settings, SchedulerConfig(), torch.Generator())
            assert torch.equal(got, expected)
    assert model.cuda_graphs is not None
    assert list(model.cuda_graphs.functions) == [("guided", 4.0, 0.7)]  # UNet and guidance in one graph
    assert model.cuda_graphs.captures == 1
    assert ReplayingGraph.made[-1].replays == 8
    with torch.no_grad():
        for scale in (2.0, 3.0, 5.0, 6.0):  # a graph per guidance scale, the oldest dropped past four
            run_stage(model, cond, uncond, x, StageSettings(1, scale), SchedulerConfig(), torch.Generator())
    assert len(model.cuda_graphs.functions) == 4 and ("guided", 4.0, 0.7) not in model.cuda_graphs.functions
    assert model.cuda_graphs.captures == 5


def test_graphs_are_dropped_when_the_weights_move_and_unused_with_autograd() -> None:
    model = unet(DECODER)
    model.enable_cuda_graphs(ReplayingGraph)
    cond = {
        "clip_text_pooled": torch.randn(1, 1, DECODER.clip_text_pooled_in_channels),
        "effnet": torch.randn(1, 16, 3, 3),
    }
    x = torch.randn(1, 4, 16, 16)
    with torch.no_grad():
        model(x, 0.5, **cond)
        assert model.cuda_graphs is not None and model.cuda_graphs.captures == 1
        other = unet(DECODER, seed=5)
        model.load_state_dict(other.state_dict(), assign=True)  # new weight tensors, same shapes
        got = model(x, 0.5, **cond).sample
        assert model.cuda_graphs.captures == 2  # the old graph read the old tensors: captured again
        assert torch.equal(got, other(x, 0.5, **cond).sample)
        model.set_fast_math()  # a setting baked into the captured step
        torch.testing.assert_close(model(x, 0.5, **cond).sample, got, atol=1e-5, rtol=1e-5)
        assert model.cuda_graphs.captures == 3
        model.double()
        model(x.double(), 0.5, **{k: v.double() for k, v in cond.items()})
        assert [len(f.graphs) for f in model.cuda_graphs.functions.values()] == [1]  # float32's dropped
    model.enable_cuda_graphs(ReplayingGraph)
    model.float()(x, 0.5, **cond).sample.sum().backward()  # training: eager, nothing captured
    assert model.cuda_graphs.captures == 0


def test_cuda_graphs_are_refused_off_cuda_with_what_to_use_instead() -> None:
    model = unet()
    with pytest.raises(ValueError, match=r"CUDA graphs need a CUDA device.*on cpu.*set_fast_math\(\)"):
        model.enable_cuda_graphs()
    assert model.cuda_graphs is None


def test_pipeline_switch_reaches_every_unet() -> None:
    from stable_cascade import StableCascadeDecoderPipeline, StableCascadePriorPipeline

    prior = StableCascadePriorPipeline(prior=unet(), text_encoder=None, tokenizer=None, scheduler=None)
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        prior.enable_cuda_graphs()
    prior.enable_cuda_graphs(ReplayingGraph)
    assert prior.prior.cuda_graphs is not None
    prior.disable_cuda_graphs()
    assert prior.prior.cuda_graphs is None
    decoder = StableCascadeDecoderPipeline(
        decoder=unet(DECODER), text_encoder=None, tokenizer=None, scheduler=None, vqgan=None
    )
    decoder.enable_model_cpu_offload(device="cpu")
    with pytest.raises(ValueError, match="disable_offload"):
        decoder.enable_cuda_graphs(ReplayingGraph)
