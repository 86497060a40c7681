"""The workers: one thread per device, each with its own engine, taking the oldest queued job.

A worker outlives anything a job does: whatever a job raises fails that job alone, with the reason in
the user's words, and the worker takes the next. When the store itself fails (a full disk, an I/O
error, a database locked by another program), the worker waits and tries again until it is back.
Every change of a job's state is one line of the log.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import PIL.Image

from stable_cascade.engine import (
    Engine,
    Event,
    ImageDone,
    Job,
    JobCancelled,
    Loading,
    Preview,
    Progress,
    open_image,
    save_png,
)
from stable_cascade.server.hub import Hub, Live
from stable_cascade.server.store import CANCELLED, DONE, FAILED, QUEUED, Store, StoredJob
from stable_cascade.server.words import job_error

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _Stopped:
    """What :meth:`Workers._retrying` gives when the server stopped while the store was failing."""


_STOPPED = _Stopped()
#: What a job is expected to fail with (logged as a warning); anything else is a bug, logged with its
#: traceback, but it too fails the job alone.
JOB_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError, MemoryError, LookupError)
#: What the store raises when its disk or database fails.
STORAGE_ERRORS = (sqlite3.Error, OSError)
#: Seconds between tries while the store is failing (doubling from the first to the last).
RETRY_SECONDS = (0.1, 5.0)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Workers:
    """The queue's consumers: start them, hand them jobs, cancel jobs, stop them."""

    def __init__(self, store: Store, hub: Hub, engines: list[Engine]) -> None:
        self.store = store
        self.hub = hub
        self.engines = engines  # one worker thread each
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._cancels: dict[str, threading.Event] = {}
        self._skips: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            logger.info("queued again %d job(s) that were running when the server stopped", recovered)
        self._threads = [
            threading.Thread(target=self._loop, args=(engine,), name=f"worker-{i}", daemon=True)
            for i, engine in enumerate(self.engines)
        ]
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop after the current steps; running jobs stay in the store and run again on restart."""
        self._stopping.set()
        with self._lock:
            for cancel in self._cancels.values():
                cancel.set()
        with self._wake:
            self._wake.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def submit(self, job: Job, input_name: str | None = None) -> StoredJob:
        """Store ``job`` at the end of the queue and wake a worker (``QueueFull`` when full)."""
        stored = self.store.add(job.to_dict(), input_name)
        position = self.store.position(stored)
        logger.info("job %s queued (%d ahead): %s, %d image(s)", stored.id, position, job.task, job.images)
        self.hub.publish(stored.id, {"type": QUEUED, "position": position})
        with self._wake:
            self._wake.notify()
        return stored

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; whether there was one to cancel."""
        if self.store.cancel_queued(job_id):
            logger.info("job %s cancelled while queued", job_id)
            self.hub.publish(job_id, {"type": CANCELLED, "error": None})
            return True
        with self._lock:
            cancel = self._cancels.get(job_id)
        if cancel is None:
            return False
        cancel.set()
        return True

    def skip_running(self) -> int:
        """Skip the batch each running job is making (A1111's skip); how many jobs."""
        with self._lock:
            skips = list(self._skips.values())
        for skip in skips:
            skip.set()
        return len(skips)

    def cancel_running(self) -> int:
        """Cancel every running job (A1111's interrupt); how many."""
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel.set()
        return len(cancels)

    def _loop(self, engine: Engine) -> None:
        while not self._stopping.is_set():
            stored = self._retrying("take the next job", self.store.claim)
            if stored is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
            elif not isinstance(stored, _Stopped):
                self._process(engine, stored)

    def _retrying(self, what: str, call: Callable[[], T]) -> T | _Stopped:
        """``call()``, tried again (waiting longer each time) while it fails; ``_STOPPED`` when the
        server stops first."""
        delay, failures = RETRY_SECONDS[0], 0
        while True:
            try:
                result = call()
            except Exception as error:  # deliberately broad: the worker must outlive the store's failures
                failures += 1
                if failures == 1 and isinstance(error, STORAGE_ERRORS):
                    logger.error("the job store failed (%s); will %s when it is back", _line(error), what)
                elif failures == 1:
                    logger.exception("could not %s; trying again", what)
            else:
                if failures:
                    logger.info("the job store is back after %d failed tries", failures)
                return result
            if self._stopping.wait(delay):
                return _STOPPED
            delay = min(2 * delay, RETRY_SECONDS[1])

    def _process(self, engine: Engine, stored: StoredJob) -> None:
        cancel, skip = threading.Event(), threading.Event()
        with self._lock:
            self._cancels[stored.id], self._skips[stored.id] = cancel, skip
        self.hub.live[stored.id] = Live(skip=skip)
        logger.info("job %s started", stored.id)
        self.hub.publish(stored.id, {"type": "started"})
        state, error, start = DONE, None, time.monotonic()
        try:
            job = Job.from_dict(stored.job, "the stored job")
            image = open_image(self.store.inputs_dir / stored.input) if stored.input else None
            previews = job.task != "reconstruct"
            for event in engine.run(job, image, previews=previews, cancel=cancel, skip=skip):
                self._handle(stored.id, event)
        except JobCancelled:
            state = CANCELLED
        except Exception as failure:  # deliberately broad: whatever one job raises fails it alone
            expected = isinstance(failure, JOB_ERRORS + STORAGE_ERRORS)
            if expected:
                logger.warning("job %s failed: %s", stored.id, _line(failure))
            else:
                logger.exception("job %s failed with an unexpected error", stored.id)
            state, error = FAILED, job_error(failure, expected)
        finally:
            with self._lock:
                self._cancels.pop(stored.id, None)
                self._skips.pop(stored.id, None)
            self.hub.live.pop(stored.id, None)
        if state == CANCELLED and self._stopping.is_set():
            return  # left running in the store: the next start runs it again
        finished = self._retrying(
            f"record job {stored.id} as {state}", lambda: self.store.finish(stored.id, state, error)
        )
        if not isinstance(finished, _Stopped):
            if state != FAILED:  # a failure was logged with its reason above
                logger.info("job %s %s after %.1f s", stored.id, state, time.monotonic() - start)
            self.hub.publish(stored.id, {"type": state, "error": error})

    def _handle(self, job_id: str, event: Event) -> None:
        live = self.hub.live[job_id]
        if isinstance(event, Progress):
            live.fraction, live.stage, live.step, live.steps = (
                event.fraction,
                event.stage,
                event.step,
                event.steps,
            )
            self.hub.publish(job_id, {"type": "progress", **dataclasses.asdict(event)})
        elif isinstance(event, Preview):
            live.preview = png_bytes(event.image)
            encoded = base64.b64encode(live.preview).decode()
            self.hub.publish(
                job_id, {"type": "preview", "index": event.index, "step": event.step, "image": encoded}
            )
        elif isinstance(event, ImageDone):
            record = event.record
            path = self.store.write_image(
                job_id,
                event.index,
                record.seed,
                record.infotext(),
                lambda p: save_png(event.image, p, record),
            )
            self.hub.publish(
                job_id, {"type": "image", "n": event.index, "seed": record.seed, "file": path.name}
            )
        elif isinstance(event, Loading):
            self.hub.publish(job_id, {"type": "loading", "models": event.models})


def _line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
