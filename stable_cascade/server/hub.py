"""Live news of running jobs: the latest progress and preview of each, and the messages that the
event streams and waiting requests (on the server's event loop) receive from the worker threads: each
job's own, and every job's (but previews) with its ``id`` for the stream of all jobs (``ALL``)."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from typing import Any

Message = dict[str, Any]
#: The subscription to every job's messages.
ALL = "*"


@dataclasses.dataclass
class Live:
    """Where a running job is: its last step and Stage C preview (PNG bytes)."""

    started: float = dataclasses.field(default_factory=time.monotonic)
    fraction: float = 0.0
    stage: str = ""
    step: int = 0
    steps: int = 0
    preview: bytes | None = None
    skip: threading.Event = dataclasses.field(default_factory=threading.Event)  # set: skipping a batch

    def eta(self) -> float:
        """Seconds until the job is done, from its pace so far (0 before the first step)."""
        if self.fraction <= 0.0:
            return 0.0
        elapsed = time.monotonic() - self.started
        return elapsed / self.fraction * (1.0 - self.fraction)


class Hub:
    """Fans each job's messages out to its subscribers; ``publish`` may be called from any thread."""

    def __init__(self) -> None:
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[Message]]] = {}
        self._lock = threading.Lock()
        self.live: dict[str, Live] = {}

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, job_id: str) -> asyncio.Queue[Message]:
        """A queue of ``job_id``'s messages from now on (call on the event loop)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(queue)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Message]) -> None:
        with self._lock:
            queues = self._subscribers.get(job_id, set())
            queues.discard(queue)
            if not queues:
                self._subscribers.pop(job_id, None)

    def publish(self, job_id: str, message: Message) -> None:
        """``message`` to ``job_id``'s subscribers, and (with the id; previews left out) to ``ALL``'s."""
        with self._lock:
            queues = [(queue, message) for queue in self._subscribers.get(job_id, ())]
            if message["type"] != "preview":
                queues += [(queue, {**message, "id": job_id}) for queue in self._subscribers.get(ALL, ())]
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for queue, item in queues:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def current(self) -> tuple[str, Live] | None:
        """The running job that started last, and where it is."""
        with self._lock:
            items = list(self.live.items())
        return max(items, key=lambda item: item[1].started, default=None)
