"""The workers: one thread per device, each with its own engine, taking the oldest queued job."""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import threading

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
from stable_cascade.server.store import CANCELLED, DONE, FAILED, Store, StoredJob

logger = logging.getLogger(__name__)
#: What a job may raise and fail with alone; anything else is a bug and stops the worker loudly.
JOB_ERRORS = (ValueError, TypeError, OSError, RuntimeError, ArithmeticError, MemoryError, LookupError)


def png_bytes(image: PIL.Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Workers:
    """The queue's consumers: start them, hand them jobs, cancel jobs, stop them."""

    def __init__(self, store: Store, hub: Hub, devices: list[str], dtype: str) -> None:
        self.store = store
        self.hub = hub
        self._wake = threading.Condition()
        self._stopping = threading.Event()
        self._cancels: dict[str, threading.Event] = {}
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, args=(device, dtype), name=f"worker-{i}", daemon=True)
            for i, device in enumerate(devices)
        ]

    def start(self) -> None:
        recovered = self.store.recover()
        if recovered:
            logger.info("queued again %d job(s) that were running when the server stopped", recovered)
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
        with self._wake:
            self._wake.notify()
        return stored

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; whether there was one to cancel."""
        if self.store.cancel_queued(job_id):
            self.hub.publish(job_id, {"type": CANCELLED})
            return True
        with self._lock:
            cancel = self._cancels.get(job_id)
        if cancel is None:
            return False
        cancel.set()
        return True

    def cancel_running(self) -> int:
        """Cancel every running job (A1111's interrupt); how many."""
        with self._lock:
            cancels = list(self._cancels.values())
        for cancel in cancels:
            cancel.set()
        return len(cancels)

    def _loop(self, device: str, dtype: str) -> None:
        engine = Engine(device=device, dtype=dtype)
        while not self._stopping.is_set():
            stored = self.store.claim()
            if stored is None:
                with self._wake:
                    self._wake.wait(timeout=1.0)
                continue
            self._process(engine, stored)

    def _process(self, engine: Engine, stored: StoredJob) -> None:
        cancel = threading.Event()
        with self._lock:
            self._cancels[stored.id] = cancel
        self.hub.live[stored.id] = Live()
        self.hub.publish(stored.id, {"type": "started"})
        state, error = DONE, None
        try:
            job = Job.from_dict(stored.job, "the stored job")
            image = open_image(self.store.inputs_dir / stored.input) if stored.input else None
            for event in engine.run(job, image, previews=job.task != "reconstruct", cancel=cancel):
                self._handle(stored.id, event)
        except JobCancelled:
            state = CANCELLED
        except JOB_ERRORS as failure:
            logger.warning("job %s failed: %s", stored.id, failure)
            state, error = FAILED, f"{type(failure).__name__}: {failure}"
        finally:
            with self._lock:
                self._cancels.pop(stored.id, None)
            self.hub.live.pop(stored.id, None)
        if state == CANCELLED and self._stopping.is_set():
            return  # left running in the store: the next start runs it again
        self.store.finish(stored.id, state, error)
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
