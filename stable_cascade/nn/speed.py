"""The UNet's speed switches: CUDA-graph replay of its steps, FP8 linears, compilation and the packed
attention projections of CPU inference (a mixin)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from stable_cascade.nn.cuda_graphs import (
    CudaGraph,
    GraphedFunction,
    GraphFactory,
    GraphSet,
    capturing,
    require_cuda,
)
from stable_cascade.nn.fp8 import disable_fp8, enable_fp8, fp8_supported
from stable_cascade.nn.fused import use_fused
from stable_cascade.nn.layers import AttnBlock, ResBlock, pack_attention
from stable_cascade.nn.regional import compile_blocks

logger = logging.getLogger(__name__)


class SpeedSwitches(nn.Module):
    """CUDA graphs (:meth:`enable_cuda_graphs`) and FP8 linears (:meth:`enable_fp8`) for
    :class:`~stable_cascade.nn.unet.StableCascadeUNet`."""

    cuda_graphs: GraphSet | None = None
    _compiled_denoise: Callable[..., torch.Tensor] | None = None
    _denoise: Callable[..., torch.Tensor]  # the per-step pass (the UNet's)
    _graphed_state: tuple[Any, ...] = ()  # the model's state when the graphs were captured

    def compile(self, *args: Any, regional: bool = False, **kwargs: Any) -> None:
        """``torch.compile`` the per-step pass; ``regional=True``: each block, one graph per block shape
        (:mod:`stable_cascade.nn.regional`; options by keyword). Combines with :meth:`enable_cuda_graphs`."""
        if regional and args:
            raise TypeError("compile(regional=True) takes torch.compile's options by keyword, e.g. mode=...")
        if regional:
            compile_blocks(self, **kwargs)  # first: it refuses CUDA-graph modes
        self._compiled_denoise = None if regional else torch.compile(self._denoise, *args, **kwargs)
        if self.cuda_graphs is not None:
            self.cuda_graphs.clear()  # captured from the uncompiled blocks

    def enable_cuda_graphs(self, make_graph: GraphFactory | None = None) -> None:
        """Replay each denoising step from a CUDA graph captured on its first call (per shape).

        Without autograd, ``unet(x, ratio, cache=…)`` and the pipelines' sampling loop (UNet and
        guidance as one graph) copy their inputs into static buffers and replay; a new batch, size or
        dtype captures a new graph (a few eager passes: seconds, no compiler). The conditioning cache
        is copied into the graph's buffers once per generation. Graphs are captured again when weights
        move or are replaced (``.to``, a LoRA) or a module setting changes (:meth:`set_fast_math`, a
        LoRA's scale); weights changed in place (fusing a LoRA) are simply read by the next replay.
        ``make_graph``: the capture mechanism (default: CUDA graphs, needing the model on a CUDA device).
        """
        if make_graph is None:
            require_cuda(next(self.parameters()).device)
            make_graph = CudaGraph
        self.cuda_graphs = GraphSet(make_graph)
        self._graphed_state = self._graph_state()

    def disable_cuda_graphs(self) -> None:
        """Run every step eagerly again and free the captured graphs."""
        self.cuda_graphs = None

    def enable_fp8(self, min_features: int = 1024, emulate: bool = False) -> int:
        """Run the ResBlock and attention linears with both sides at least ``min_features`` wide in
        FP8 (e4m3, per-row scales; :mod:`stable_cascade.nn.fp8`); returns how many were converted.

        Meant for Stage C's big linears on H100/H200 (compute capability 9.0). The quantized weights are
        an extra copy (one byte per weight) next to the original ones, which stay for :meth:`disable_fp8`
        and saving; call again after changing the weights (LoRA fusing). ``emulate``: the same
        quantization with a float32 matmul, on any device, to measure the quality effect.
        """
        device = next(self.parameters()).device
        if not emulate and not fp8_supported(device):
            raise ValueError(
                f"FP8 matmuls need an NVIDIA GPU of compute capability 9.0 or newer (H100/H200); this "
                f"model is on {device.type}. Use bfloat16 instead (model.to(torch.bfloat16)), or "
                "enable_fp8(emulate=True) to measure FP8's effect on the outputs"
            )
        disable_fp8(self)  # re-quantize from the current weights
        blocks = [m for m in self.modules() if isinstance(m, (ResBlock, AttnBlock))]
        return enable_fp8(blocks, min_features, emulate)

    def disable_fp8(self) -> None:
        """Back to the original linears (the weights were kept)."""
        disable_fp8(self)

    def graphed(
        self, name: Any, fn: Callable[..., torch.Tensor], invariant: tuple[int, ...] = ()
    ) -> GraphedFunction | None:
        """``fn`` replayed from graphs stored under ``name`` when graphs are on and usable here (no
        autograd, not already inside a capture), else None: the caller runs ``fn`` itself."""
        if self.cuda_graphs is None or capturing() or torch.is_grad_enabled():
            return None
        return self.cuda_graphs.function(name, fn, invariant)

    def start_generation(self, like: torch.Tensor) -> None:
        """Once per generation, before its steps (``like``: one of its inputs): on CPUs without autograd,
        pack each self-attention's query, key and value projections, so that each step projects with
        one matmul (:func:`~stable_cascade.nn.layers.pack_attention`); then :meth:`check_graphs`."""
        if use_fused(like):
            pack_attention(self)
        self.check_graphs()

    def check_graphs(self) -> None:
        """Drop the captured graphs when a weight tensor was replaced or a module setting changed."""
        if self.cuda_graphs is None:
            return
        state = self._graph_state()
        if state != self._graphed_state:
            if self.cuda_graphs.captures:
                logger.info("weights or settings changed: capturing the CUDA graphs again")
            self.cuda_graphs.clear()
            self._graphed_state = state

    def _graph_state(self) -> tuple[Any, ...]:
        """What a captured graph bakes in: where every weight is, and every module's plain settings
        (``fast`` math, a LoRA adapter's ``scale`` and ``fused``, ``training``, ...)."""
        addresses = tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers()))
        settings = tuple(
            (name, key, value)
            for name, module in self.named_modules()
            for key, value in vars(module).items()
            if isinstance(value, (bool, int, float, str))
        )
        return addresses, settings
