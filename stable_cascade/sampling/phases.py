"""Wall-clock times of a pipeline call's phases, by name, for benchmarks; off unless recorded.

    with record_phases() as phases:
        pipe(prompt)
    phases.totals()  # {"Stage C text encoding": 0.012, "Stage C set-up": 0.004, "Stage C step 1": …}

The pipelines mark their phases with :func:`phase` (text encoding, set-up, Stage A decode, output
conversion) and the sampling loop its steps with :func:`timed_steps`. Without an active recorder
:func:`phase` reads one context variable and returns a shared null context, and :func:`timed_steps`
hands the step wrapper back unchanged: nothing is timed, nothing synchronised.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar

from stable_cascade.diffusion.timesteps import Progress

_RECORDER: ContextVar[PhaseRecorder | None] = ContextVar("stable_cascade_phases", default=None)
_OFF: contextlib.AbstractContextManager[None] = contextlib.nullcontext()


class PhaseRecorder:
    """``(name, seconds)`` of every phase run while recording, in the order they ended.

    ``synchronize`` (e.g. ``torch.cuda.synchronize``) runs before each clock read, so that
    asynchronous devices are timed by the work they did, not by the work they were given.
    """

    def __init__(self, synchronize: Callable[[], None] | None = None) -> None:
        self.records: list[tuple[str, float]] = []
        self.synchronize = synchronize

    @contextlib.contextmanager
    def span(self, name: str) -> Iterator[None]:
        self._sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.records.append((name, time.perf_counter() - start))

    def totals(self) -> dict[str, float]:
        """Seconds per phase name (summed where a name repeats), in first-seen order."""
        totals: dict[str, float] = {}
        for name, seconds in self.records:
            totals[name] = totals.get(name, 0.0) + seconds
        return totals

    def _sync(self) -> None:
        if self.synchronize is not None:
            self.synchronize()


@contextlib.contextmanager
def record_phases(synchronize: Callable[[], None] | None = None) -> Iterator[PhaseRecorder]:
    """Record the phases of every pipeline call made inside the ``with`` block (this thread/task)."""
    recorder = PhaseRecorder(synchronize)
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def phase(name: str) -> contextlib.AbstractContextManager[None]:
    """A context that times the phase ``name`` while recording, and does nothing otherwise."""
    recorder = _RECORDER.get()
    return _OFF if recorder is None else recorder.span(name)


def timed_steps(stage: str, progress: Progress | None) -> Progress | None:
    """``progress`` (a sampler's step wrapper), timing each step as ``"{stage} step {i + 1}"`` while
    recording; ``progress`` itself otherwise."""
    recorder = _RECORDER.get()
    if recorder is None:
        return progress

    def steps(indices: Iterable[int]) -> Iterator[int]:
        for i in indices if progress is None else progress(indices):
            with recorder.span(f"{stage} step {i + 1}"):  # from handing out i to asking for the next
                yield i

    return steps
