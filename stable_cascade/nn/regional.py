"""Regional ``torch.compile``: every res, timestep and attention block compiled, one graph per block
shape, none left to run eagerly by dynamo's recompile limit.

Blocks are grouped by their type and parameter shapes; each group gets its own compiled region (its
own code object, so its own cache and recompile count), shared by all its blocks, with static
shapes: one graph per input shape it meets (batch, resolution). ``Module.compile`` on each block
instead shares one cache between every kind and width of block (``Module._call_impl``), so a
UNet with a few channel widths passes dynamo's default limit of 8 graphs and the rest runs
eagerly, which an H200 run of the full Stage B showed.
"""

from __future__ import annotations

import functools
import inspect
import logging
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stable_cascade.nn.layers import AttnBlock, ResBlock, TimestepBlock

logger = logging.getLogger(__name__)

#: How many input shapes (batch sizes × resolutions) each region may compile for.
SHAPES_PER_REGION = 16


def _run_block(block: nn.Module, *args: Any) -> Any:
    return type(block).forward(block, *args)


def _region(index: int) -> Callable[..., Any]:
    """A fresh copy of :func:`_run_block`: a code object of its own, hence a dynamo cache of its own."""
    code = _run_block.__code__.replace(co_name=f"block_region_{index}")
    return types.FunctionType(code, _run_block.__globals__, code.co_name)


def _signature(block: nn.Module) -> tuple[Any, ...]:
    shapes = tuple((name, tuple(p.shape), p.dtype) for name, p in block.named_parameters())
    return (type(block), shapes)


def refuse_cuda_graph_modes(kwargs: dict[str, Any]) -> None:
    options = kwargs.get("options") or {}
    if kwargs.get("mode") in ("reduce-overhead", "max-autotune") or options.get("triton.cudagraphs"):
        raise ValueError(
            f"compile(mode={kwargs.get('mode')!r}, regional=True): CUDA graphs need the whole pass "
            "(blocks sharing one graph overwrite each other's outputs); use regional=False with that "
            "mode, or regional=True with mode='default' or 'max-autotune-no-cudagraphs' plus "
            "enable_cuda_graphs(), which captures the whole step"
        )


def compile_blocks(model: nn.Module, **kwargs: Any) -> int:
    """``torch.compile`` every res, timestep and attention block of ``model`` (see the module
    docstring); ``kwargs`` go to ``torch.compile`` (``dynamic`` defaults to False). Returns the
    number of regions. CUDA-graph modes are refused: use ``enable_cuda_graphs`` on top instead."""
    refuse_cuda_graph_modes(kwargs)
    kwargs.setdefault("dynamic", False)
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        kwargs.setdefault("recompile_limit", SHAPES_PER_REGION)
    elif torch._dynamo.config.recompile_limit < SHAPES_PER_REGION:  # an older torch: one global limit
        logger.info("raising torch._dynamo.config.recompile_limit to %d", SHAPES_PER_REGION)
        torch._dynamo.config.recompile_limit = SHAPES_PER_REGION
    regions: dict[tuple[Any, ...], Callable[..., Any]] = {}
    for block in model.modules():
        if isinstance(block, (ResBlock, TimestepBlock, AttnBlock)):
            key = _signature(block)
            if key not in regions:
                regions[key] = torch.compile(_region(len(regions)), **kwargs)
            block._compiled_call_impl = functools.partial(regions[key], block)
    logger.info("compiled %d block regions", len(regions))
    return len(regions)
