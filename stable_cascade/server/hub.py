"""The news of jobs for this process's event streams and waiting requests: each job's subscribers (on
the server's event loop) and, per job, how far its news has been handed on (the store's sequence
number). :mod:`stable_cascade.server.relay` brings the news from the store, whichever process posted it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]


class Hub:
    """Fans each job's messages out to its subscribers; ``publish`` may be called from any thread.
    ``cursor(job_id)``: the sequence number of the job's latest news (where a first subscriber starts)."""

    def __init__(self, cursor: Callable[[str], int]) -> None:
        self._cursor = cursor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[Message]]] = {}
        self._cursors: dict[str, int] = {}
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, job_id: str) -> asyncio.Queue[Message]:
        """A queue of ``job_id``'s messages from now on (call on the event loop)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        with self._lock:
            first = job_id not in self._subscribers
        start = self._cursor(job_id) if first else 0
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(queue)
            self._cursors.setdefault(job_id, start)
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Message]) -> None:
        with self._lock:
            queues = self._subscribers.get(job_id, set())
            queues.discard(queue)
            if not queues:
                self._subscribers.pop(job_id, None)
                self._cursors.pop(job_id, None)

    def cursors(self) -> dict[str, int]:
        """Each subscribed job's cursor: the news after it is still to be handed on."""
        with self._lock:
            return dict(self._cursors)

    def publish(self, job_id: str, seq: int, message: Message) -> None:
        """Hand on ``job_id``'s news number ``seq`` (once: news at or before the cursor is dropped)."""
        with self._lock:
            if seq <= self._cursors.get(job_id, seq):
                return
            self._cursors[job_id] = seq
            queues = list(self._subscribers.get(job_id, ()))
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        for queue in queues:
            loop.call_soon_threadsafe(queue.put_nowait, message)


async def next_message(queue: asyncio.Queue[Message], timeout: float) -> Message | None:
    """The next message, or None after ``timeout`` seconds; never loses one (``asyncio.wait_for`` on
    ``queue.get()`` can, when the timeout and the message come together)."""
    with contextlib.suppress(asyncio.QueueEmpty):
        return queue.get_nowait()
    getter = asyncio.ensure_future(queue.get())
    done, _ = await asyncio.wait({getter}, timeout=timeout)
    if getter not in done:
        getter.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await getter  # it came as it was cancelled
        return None
    return getter.result()
