"""The UNet's GPU speed switches: CUDA-graph replay of its steps and FP8 linears (a mixin)."""

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

logger = logging.getLogger(__name__)


class SpeedSwitches(nn.Module):
    """CUDA graphs (:meth:`enable_cuda_graphs`) for :class:`~stable_cascade.nn.unet.StableCascadeUNet`."""

    cuda_graphs: GraphSet | None = None
    _graphed_weights: tuple[int, ...] = ()  # where the weights were when the graphs were captured

    def enable_cuda_graphs(self, make_graph: GraphFactory | None = None) -> None:
        """Replay each denoising step from a CUDA graph captured on its first call (per shape).

        Without autograd, ``unet(x, ratio, cache=…)`` and the pipelines' sampling loop (UNet and
        guidance as one graph) copy their inputs into static buffers and replay; a new batch, size or
        dtype captures a new graph (a few eager passes: seconds, no compiler). The conditioning cache
        is copied into the graph's buffers once per generation. Graphs are dropped when the weights
        move (``.to``, loading a LoRA that replaces tensors). ``make_graph``: the capture mechanism
        (default: CUDA graphs, which need the model on a CUDA device).
        """
        if make_graph is None:
            require_cuda(next(self.parameters()).device)
            make_graph = CudaGraph
        self.cuda_graphs = GraphSet(make_graph)
        self._graphed_weights = self._weight_addresses()

    def disable_cuda_graphs(self) -> None:
        """Run every step eagerly again and free the captured graphs."""
        self.cuda_graphs = None

    def graphed(
        self, name: Any, fn: Callable[..., torch.Tensor], invariant: tuple[int, ...] = ()
    ) -> GraphedFunction | None:
        """``fn`` replayed from graphs stored under ``name`` when graphs are on and usable here (no
        autograd, not already inside a capture), else None: the caller runs ``fn`` itself."""
        if self.cuda_graphs is None or capturing() or torch.is_grad_enabled():
            return None
        return self.cuda_graphs.function(name, fn, invariant)

    def check_graphs(self) -> None:
        """Drop the captured graphs when a weight tensor was replaced since they were captured."""
        if self.cuda_graphs is None:
            return
        addresses = self._weight_addresses()
        if addresses != self._graphed_weights:
            if self.cuda_graphs.captures:
                logger.info("weights moved or were replaced: capturing the CUDA graphs again")
            self.cuda_graphs.clear()
            self._graphed_weights = addresses

    def _weight_addresses(self) -> tuple[int, ...]:
        return tuple(t.data_ptr() for t in (*self.parameters(), *self.buffers()))
