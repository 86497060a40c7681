"""Replay of an eager function from a captured CUDA graph, without the compiler.

A :class:`GraphedFunction` wraps ``fn(*args) -> Tensor`` whose arguments are tensors, or tuples,
named tuples and frozen dataclasses of tensors and plain values (a ``UNetCache``). On the first call
for a given structure (shapes, dtypes, devices and plain values of every argument) it allocates
static input buffers, copies the arguments in, and captures ``fn`` on them; later calls copy the
new arguments into those buffers and replay. For the arguments named ``invariant`` (by position), a
tensor that is the very object copied last time (and, outside inference mode, unchanged since: its
version counter) is not copied again: a sampling loop's step-invariant cache is copied once per
generation, not once per step. The result is a fresh copy of the static output
(with ``copy_output=False``: the static output itself, valid until the next call).

The capture mechanism is injected (:class:`Graph`): :class:`CudaGraph` captures on a CUDA stream
after warm-up runs on a side stream, as PyTorch's documentation prescribes; tests use a fake that
re-runs the function on the static buffers, which exercises all the bookkeeping on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast

import torch

logger = logging.getLogger(__name__)

_local = threading.local()


class Graph(Protocol):
    """Captures one run of a function (``capture`` returns its output) and replays it."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor: ...

    def replay(self) -> None: ...


#: ``make_graph(device)``: a fresh :class:`Graph` for functions whose inputs are on ``device``.
GraphFactory = Callable[[torch.device], Graph]


def capturing() -> bool:
    """Whether this thread is inside a capture or a warm-up run: nested graphs must run eagerly."""
    return getattr(_local, "depth", 0) > 0


@contextmanager
def _inside_capture() -> Iterator[None]:
    _local.depth = getattr(_local, "depth", 0) + 1
    try:
        yield
    finally:
        _local.depth -= 1


def require_cuda(device: torch.device) -> None:
    """Refuse CUDA graphs for a module or tensors on a non-CUDA ``device``, saying what to use instead."""
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"CUDA graphs need a CUDA device, but the model runs on {device.type}; move it first "
            "(.to('cuda')), or on this device leave graphs off and use set_fast_math() or compile()"
        )


class CudaGraph:
    """A ``torch.cuda.CUDAGraph`` captured after ``warmup`` runs on a side stream."""

    def __init__(self, device: torch.device, warmup: int = 2) -> None:
        require_cuda(device)
        self.device, self.warmup = device, warmup
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):  # lazy initialisation (cuBLAS handles, autotuning) before capture
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)
        with torch.cuda.graph(self.graph):
            return fn()

    def replay(self) -> None:
        self.graph.replay()


# -- argument trees ---------------------------------------------------------------------------------


def _flatten(value: Any, leaves: list[torch.Tensor]) -> Any:
    """The structure of ``value`` with each tensor replaced by its signature; tensors go to ``leaves``."""
    if isinstance(value, torch.Tensor):
        leaves.append(value)
        return ("tensor", tuple(value.shape), tuple(value.stride()), value.dtype, value.device)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = tuple((f.name, _flatten(getattr(value, f.name), leaves)) for f in dataclasses.fields(value))
        return (type(value), fields)
    if isinstance(value, (tuple, list)):
        return (type(value), tuple(_flatten(v, leaves) for v in value))
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    raise TypeError(
        f"a graphed function takes tensors, tuples/lists/dataclasses of them and plain values; got "
        f"{type(value).__name__}"
    )


def _unflatten(structure: Any, leaves: Iterator[torch.Tensor]) -> Any:
    if isinstance(structure, tuple) and structure and structure[0] == "tensor":
        return next(leaves)
    if isinstance(structure, tuple) and len(structure) == 2 and isinstance(structure[0], type):
        kind, items = structure
        if dataclasses.is_dataclass(kind):
            return cast(Callable[..., Any], kind)(**{name: _unflatten(s, leaves) for name, s in items})
        values = [_unflatten(s, leaves) for s in items]
        return kind(*values) if hasattr(kind, "_fields") else kind(values)
    return structure


def _layout(t: torch.Tensor) -> torch.memory_format:
    """A static buffer's layout: channels-last where ``t`` is (the UNet's activations), else contiguous."""
    channels_last = (
        t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
    )
    return torch.channels_last if channels_last else torch.contiguous_format


@dataclasses.dataclass
class _Captured:
    graph: Graph
    inputs: list[torch.Tensor]  # the static buffers the graph reads
    output: torch.Tensor  # the static buffer it writes
    sources: list[tuple[weakref.ref[torch.Tensor], int] | None]  # what was copied in last, per input
    reusable: list[bool]  # per input: whether it comes from an invariant argument


class GraphedFunction:
    """``fn`` replayed from one captured graph per argument structure (at most ``max_graphs`` kept)."""

    def __init__(
        self,
        fn: Callable[..., torch.Tensor],
        make_graph: GraphFactory,
        invariant: tuple[int, ...] = (),
        max_graphs: int = 4,
        copy_output: bool = True,
    ) -> None:
        self.fn, self.make_graph, self.invariant = fn, make_graph, invariant
        self.max_graphs, self.copy_output = max_graphs, copy_output
        self.graphs: OrderedDict[Any, _Captured] = OrderedDict()
        self.captures = 0  # how many graphs were captured so far

    def __call__(self, *args: Any) -> torch.Tensor:
        leaves: list[torch.Tensor] = []
        reusable: list[bool] = []
        structure = []
        for position, arg in enumerate(args):
            structure.append(_flatten(arg, leaves))
            reusable += [position in self.invariant] * (len(leaves) - len(reusable))
        key = (tuple, tuple(structure))
        entry = self.graphs.get(key)
        if entry is None:
            entry = self._capture(key, leaves, reusable)
        else:
            self.graphs.move_to_end(key)
            self._copy_in(entry, leaves)
        with _inside_capture():  # a replay runs no Python; a fake one must not nest graphs either
            entry.graph.replay()
        return entry.output.clone() if self.copy_output else entry.output

    def _capture(self, key: Any, leaves: list[torch.Tensor], reusable: list[bool]) -> _Captured:
        if len(self.graphs) >= self.max_graphs:
            self.graphs.popitem(last=False)  # the least recently used
        device = leaves[0].device if leaves else torch.device("cpu")
        with torch.inference_mode(False):  # buffers usable inside and outside inference mode
            inputs = [torch.empty_like(t, memory_format=_layout(t)) for t in leaves]
        entry = _Captured(self.make_graph(device), inputs, torch.empty(0), [None] * len(leaves), reusable)
        self._copy_in(entry, leaves)
        static_args = _unflatten(key, iter(inputs))
        logger.debug(
            "capturing a graph of %s for %d inputs", getattr(self.fn, "__name__", self.fn), len(leaves)
        )
        with _inside_capture():
            entry.output = entry.graph.capture(lambda: self.fn(*static_args))
        self.captures += 1
        self.graphs[key] = entry
        return entry

    @staticmethod
    def _copy_in(entry: _Captured, leaves: list[torch.Tensor]) -> None:
        for i, (buffer, tensor) in enumerate(zip(entry.inputs, leaves, strict=True)):
            version = -1 if tensor.is_inference() else tensor._version  # inference tensors keep none
            last = entry.sources[i]
            if entry.reusable[i] and last is not None and last[0]() is tensor and last[1] == version:
                continue  # the same, unchanged tensor as last time: already in the buffer
            buffer.copy_(tensor)
            entry.sources[i] = (weakref.ref(tensor), version) if entry.reusable[i] else None

    def clear(self) -> None:
        """Drop every captured graph (and its memory)."""
        self.graphs.clear()


class GraphSet:
    """A model's graphed functions by name (e.g. one per guidance scale), all made with one graph
    factory; at most ``max_functions`` are kept, the least recently used dropped first."""

    def __init__(self, make_graph: GraphFactory, max_functions: int = 4) -> None:
        self.make_graph, self.max_functions = make_graph, max_functions
        self.functions: OrderedDict[Any, GraphedFunction] = OrderedDict()
        self.dropped_captures = 0  # captures of functions dropped since

    def function(
        self, name: Any, fn: Callable[..., torch.Tensor], invariant: tuple[int, ...] = ()
    ) -> GraphedFunction:
        """The graphed ``fn`` stored under ``name`` (made on first use: ``fn`` must be the same each time)."""
        if name in self.functions:
            self.functions.move_to_end(name)
            return self.functions[name]
        if len(self.functions) >= self.max_functions:
            self.dropped_captures += self.functions.popitem(last=False)[1].captures
        self.functions[name] = GraphedFunction(fn, self.make_graph, invariant)
        return self.functions[name]

    @property
    def captures(self) -> int:
        """How many graphs were captured so far."""
        return self.dropped_captures + sum(f.captures for f in self.functions.values())

    def clear(self) -> None:
        for function in self.functions.values():
            function.clear()
