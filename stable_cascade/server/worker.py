"""The workers: one thread per device, each with its own engine, pulling jobs from the store.

They run inside ``serve`` (its workers) or in a process of their own (``stable-cascade worker``, on any
host that reaches the store). Each claims the queued job of highest priority under a lease, posts the
job's news to the store, and records its images and its end there. A heartbeat renews the leases,
brings back cancel requests and returns to the queue the jobs of workers that stopped (their lease ran
out). A worker outlives anything a job does: whatever a job raises fails that job alone, with the
reason in the user's words, and the worker takes the next. When the store itself fails (a full disk,
an I/O error, a database restarting), the worker waits and tries again until it is back. Every change
of a job's state is one line of the log.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

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
    encode_png,
    open_image,
)
from stable_cascade.server.board import JOBS, Orders
from stable_cascade.server.image_prompts import NAMES as IMAGE_PROMPTS
from stable_cascade.server.store import (
    CANCELLED,
    DONE,
    FAILED,
    LEASE_SECONDS,
    STORAGE_ERRORS,
    Store,
    StoredJob,
    StoreError,
)
from stable_cascade.server.words import job_error

logger = logging.getLogger(__name__)
T = TypeVar("T")


class _Stopped:
    """What :meth:`Workers._retrying` gives when the workers stopped while the store was failing."""


_STOPPED = _Stopped()
#: What a job is expected to fail with (logged as a warning); anything else is a bug, logged with its
#: traceback, but it too fails the job alone.
JOB_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError, MemoryError, LookupError)
#: Seconds between tries while the store is failing (doubling from the first to the last).
RETRY_SECONDS = (0.1, 5.0)
POLL_SECONDS = 0.5  # an idle worker looks at the queue this often (besides notifications)
PRUNE_SECONDS = 60.0  # old news is forgotten this often


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclasses.dataclass
class _Run:
    """The job a worker runs: its id and the events that stop it, or skip its batch, after the current
    step."""

    job_id: str
    cancel: threading.Event = dataclasses.field(default_factory=threading.Event)
    skip: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: skip the batch


class Workers:
    """The store's consumers in this process: start them, stop them.

    ``kind``: ``serve`` (a server's own workers: when the store is a data folder, its lock makes them
    the folder's only ones, so a start queues again what a killed server was running) or ``worker``;
    ``lease``: seconds a claim holds without a heartbeat; ``models``: those the workers keep warm.
    """

    def __init__(
        self,
        store: Store,
        engines: list[Engine],
        *,
        kind: str = "serve",
        lease: float = LEASE_SECONDS,
        models: Iterable[str] = (),
    ) -> None:
        self.store = store
        self.engines = engines  # one worker thread each
        self.devices = [str(engine.device) for engine in engines]
        self.kind = kind
        self.lease = lease
        self.models = list(models)
        self._stopping = threading.Event()
        self._ended = threading.Event()  # the job threads have ended: the heartbeats end too
        self._lock = threading.Lock()
        self._runs: dict[str, _Run | None] = {}  # worker id → its job
        self._threads: list[threading.Thread] = []  # one per engine
        self._beat: threading.Thread | None = None

    def start(self) -> None:
        self._retrying("queue again the jobs stopped workers left", self._recover)
        ids = [self.store.register(self.kind, device, self.models) for device in self.devices]
        self._runs = dict.fromkeys(ids)
        self._threads = [
            threading.Thread(target=self._loop, args=(engine, ids[i]), name=f"worker-{i}", daemon=True)
            for i, engine in enumerate(self.engines)
        ]
        self._beat = threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True)
        for thread in [*self._threads, self._beat]:
            thread.start()

    def stop(self, grace: float = 0.0, timeout: float = 30.0, hurry: threading.Event | None = None) -> None:
        """Take no more jobs; let running ones finish for ``grace`` seconds (or until ``hurry`` is set),
        then stop them after their current step and queue them again (in their place) for another
        worker."""
        self._stopping.set()
        deadline = time.monotonic() + grace
        while self.running() and time.monotonic() < deadline and not (hurry and hurry.is_set()):
            time.sleep(0.05)
        with self._lock:
            for run in self._runs.values():
                if run is not None:
                    run.cancel.set()
        for thread in self._threads:
            thread.join(timeout)
        self._ended.set()  # the leases were renewed until here, through the grace period
        if self._beat is not None:
            self._beat.join(timeout)
        for worker in self._runs:
            self._quietly(functools.partial(self.store.worker_stopped, worker))

    def running(self) -> list[str]:
        """The jobs this process's workers run."""
        with self._lock:
            return [run.job_id for run in self._runs.values() if run is not None]

    def _recover(self) -> int:
        return self.store.recover(None if self.kind == "serve" else False)

    def _loop(self, engine: Engine, worker: str) -> None:
        listener = self.store.db.listen(JOBS)
        try:
            while not self._stopping.is_set():
                stored = self._retrying("take the next job", lambda: self.store.claim(worker, self.lease))
                if stored is None:
                    listener.wait(POLL_SECONDS)
                elif not isinstance(stored, _Stopped):
                    self._process(engine, worker, stored)
        finally:
            listener.close()

    def _heartbeats(self) -> None:
        """Renew the leases of running jobs, pass on cancel requests, stop jobs taken from us, and
        return to the queue the jobs of workers that stopped."""
        pruned = 0.0
        while not self._ended.wait(min(1.0, self.lease / 3)):
            with self._lock:
                holding = {worker: run.job_id if run else None for worker, run in self._runs.items()}
            try:
                held = self.store.heartbeat(holding, self.lease)
                self.store.reap()
                if time.monotonic() - pruned > PRUNE_SECONDS:
                    self.store.prune()
                    pruned = time.monotonic()
            except STORAGE_ERRORS as error:
                logger.warning("the heartbeat could not reach the job store (%s)", _line(error))
                continue
            with self._lock:
                for worker, run in self._runs.items():
                    if run is not None and holding.get(worker) == run.job_id and held.get(run.job_id, True):
                        run.cancel.set()  # cancelling was asked, or the job was taken from us

    def _retrying(self, what: str, call: Callable[[], T]) -> T | _Stopped:
        """``call()``, tried again (waiting longer each time) while it fails; ``_STOPPED`` when the
        workers stop first."""
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

    def _quietly(self, call: Callable[[], object]) -> None:
        try:
            call()
        except STORAGE_ERRORS as error:
            logger.warning("the job store failed while stopping (%s)", _line(error))

    def _process(self, engine: Engine, worker: str, stored: StoredJob) -> None:
        run = _Run(stored.id)
        with self._lock:
            self._runs[worker] = run
        logger.info("job %s started", stored.id)
        state, error, start = DONE, None, time.monotonic()
        try:
            job = Job.from_dict(self._local_inputs(stored.job), "the stored job")
            image = open_image(self.store.input_file(stored.input)) if stored.input else None
            previews = job.task != "reconstruct"
            for event in engine.run(job, image, previews=previews, cancel=run.cancel, skip=run.skip):
                orders = self._handle(stored.id, worker, event)
                if orders.stop:
                    run.cancel.set()
                if orders.skip:
                    run.skip.set()
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
                self._runs[worker] = None
        if state == CANCELLED and self._stopping.is_set():
            self._quietly(lambda: self.store.release(stored.id, worker))
            return
        finished = self._retrying(
            f"record job {stored.id} as {state}", lambda: self.store.finish(stored.id, state, error, worker)
        )
        if finished is False:
            logger.warning("job %s was taken from this worker (its lease ran out); another ran it", stored.id)
        elif finished is True and state != FAILED:  # a failure was logged with its reason above
            logger.info("job %s %s after %.1f s", stored.id, state, time.monotonic() - start)

    def _local_inputs(self, job: dict[str, Any]) -> dict[str, Any]:
        """``job`` with its control images and image prompts as files on this host."""
        paths = {key: job[key] for key in ("control_image", "mask") if isinstance(job.get(key), str)}
        local = job | {key: str(self.store.input_file(Path(path).name)) for key, path in paths.items()}
        for key in IMAGE_PROMPTS:  # lists of {"path", "strength", "sha256"}
            items = job.get(key)
            if isinstance(items, list):
                local[key] = [self._local_prompt(item) for item in items]
        return local

    def _local_prompt(self, item: object) -> object:
        if isinstance(item, dict) and isinstance(item.get("path"), str):
            return item | {"path": str(self.store.input_file(Path(item["path"]).name))}
        return item  # the job's validation names what is wrong with it

    def _handle(self, job_id: str, worker: str, event: Event) -> Orders:
        """Record ``event``; what the job's worker is asked."""
        if isinstance(event, ImageDone):
            record = event.record
            png = encode_png(event.image, record)
            self._reconnecting(
                lambda: self.store.write_image(job_id, event.index, record.seed, record.infotext(), png)
            )
            return Orders()
        if isinstance(event, Progress):
            message = {"type": "progress", **dataclasses.asdict(event)}
        elif isinstance(event, Preview):
            encoded = base64.b64encode(png_bytes(event.image)).decode()
            message = {"type": "preview", "index": event.index, "step": event.step, "image": encoded}
        elif isinstance(event, Loading):
            message = {"type": "loading", "models": event.models}
        else:
            return Orders()
        try:
            return self.store.post(job_id, message, worker)
        except STORAGE_ERRORS as error:  # live news only: the job goes on without it
            logger.debug("job %s: news not posted (%s)", job_id, _line(error))
            return Orders()

    def _reconnecting(self, call: Callable[[], None]) -> None:
        """``call()``, tried again while the store cannot be reached (a database restarting); other
        storage errors (a full disk) fail the job."""
        delay = RETRY_SECONDS[0]
        while True:
            try:
                return call()
            except StoreError as error:
                if self._stopping.wait(delay):
                    raise
                logger.warning("the job store cannot be reached (%s); trying again", _line(error))
                delay = min(2 * delay, RETRY_SECONDS[1])


def _line(error: BaseException) -> str:
    """The error's message on one line."""
    return " ".join(str(error).split()) or type(error).__name__
