"""Issue 19: regional compile that really compiles: one region per block shape, none left eager."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch

import tiny
from stable_cascade import StableCascadeUNet
from stable_cascade.specs import UNET_VARIANTS

PRIOR = UNET_VARIANTS["tiny_prior"]


def prior() -> StableCascadeUNet:
    return tiny.randomize_(StableCascadeUNet(PRIOR), scale=0.1).eval()  # type: ignore[return-value]


def conditioning(batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    return {
        "clip_text": torch.randn(batch, 7, 24, generator=g),
        "clip_text_pooled": torch.randn(batch, 1, 24, generator=g),
        "clip_img": torch.randn(batch, 1, 16, generator=g),
    }


@pytest.mark.slow
def test_every_block_shape_compiles_past_dynamos_default_recompile_limit() -> None:
    """Nine input shapes × four block regions: 36 graphs. With one shared cache (``Module.compile``
    per block) dynamo stops at 8 and runs the rest eagerly; with automatic dynamic shapes it would
    trace one dynamic graph per region instead of one static graph per shape."""
    model, eager = prior(), prior()
    graphs: list[torch.fx.GraphModule] = []

    def backend(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        graphs.append(graph)
        return graph.forward  # no code generation: counts what dynamo hands on

    torch._dynamo.reset()
    model.compile(backend=backend, regional=True)
    shapes = [(batch, size) for batch in (1, 2, 3) for size in ((4, 4), (6, 4), (4, 6))]
    with torch.no_grad():
        for batch, size in shapes:
            x = torch.randn(batch, 16, *size, generator=torch.Generator().manual_seed(0))
            cond = conditioning(batch)
            torch.testing.assert_close(model(x, 0.5, **cond).sample, eager(x, 0.5, **cond).sample)
    assert len(graphs) == 4 * len(shapes)
    assert not any(_symbolic(node) for g in graphs for node in g.graph.nodes)  # static shapes


def _symbolic(node: torch.fx.Node) -> bool:
    value = node.meta.get("example_value", node.meta.get("val"))
    return isinstance(value, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in value.shape)


def _compiler_missing() -> str | None:
    if not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return "inductor needs a C++ compiler on CPUs; none found"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_compiler_missing() is not None, reason=str(_compiler_missing()))
def test_inductor_regions_match_eager_and_none_falls_back() -> None:
    from torch._dynamo.utils import counters

    model, eager = prior(), prior()
    torch._dynamo.reset()
    counters.clear()
    model.compile(regional=True)  # inductor, mode default
    x = torch.randn(2, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = conditioning(2)
    with torch.no_grad():
        expected = eager(x, 0.5, **cond).sample
        for _ in range(2):
            torch.testing.assert_close(model(x, 0.5, **cond).sample, expected, atol=1e-5, rtol=1e-5)
    assert counters["stats"]["unique_graphs"] == 4  # one per block region
    assert not [k for k in counters["unimplemented"] if "recompile" in str(k).lower()]
