"""The news of jobs for this process's event streams and waiting requests: each job's subscribers (on
the server's event loop) and, per job, how far its news has been handed on (the store's sequence
number); and the subscribers of every job's news (``ALL``: previews left out, each message with its
``id``). :mod:`stable_cascade.server.relay` brings the news from the store, whichever process posted it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

Message = dict[str, Any]
#: The subscription to every job's messages.
ALL = "*"
#: Seconds the number of a news item handed on to ``ALL`` is remembered: the relay looks again at the
#: latest seconds of news (concurrent writers may commit it out of the order of its numbers).
SEEN_SECONDS = 30.0


class Hub:
    """Fans each job's messages out to its subscribers; ``publish`` may be called from any thread.
    ``cursor(job_id)``: the sequence number of the job's latest news (``ALL``: of anyone's), where a
    first subscriber starts."""

    def __init__(self, cursor: Callable[[str], int]) -> None:
        self._cursor = cursor
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subscribers: dict[str, set[asyncio.Queue[Message]]] = {}
        self._cursors: dict[str, int] = {}
        self._seen: dict[int, float] = {}  # every job's news handed on lately → when
        self._all_start = 0  # where ALL's subscribers started
        self._lock = threading.Lock()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def subscribe(self, job_id: str) -> asyncio.Queue[Message]:
        """A queue of ``job_id``'s messages (``ALL``: every job's) from now on (call on the event loop)."""
        queue: asyncio.Queue[Message] = asyncio.Queue()
        with self._lock:
            first = job_id not in self._subscribers
        start = self._cursor(job_id) if first else 0
        with self._lock:
            self._subscribers.setdefault(job_id, set()).add(queue)
            self._cursors.setdefault(job_id, start)
            if first and job_id == ALL:
                self._all_start = start
        return queue

    def unsubscribe(self, job_id: str, queue: asyncio.Queue[Message]) -> None:
        with self._lock:
            queues = self._subscribers.get(job_id, set())
            queues.discard(queue)
            if not queues:
                self._subscribers.pop(job_id, None)
                self._cursors.pop(job_id, None)
                if job_id == ALL:
                    self._seen.clear()

    def cursors(self) -> dict[str, int]:
        """Each subscribed job's cursor: the news after it is still to be handed on."""
        with self._lock:
            return {job_id: seq for job_id, seq in self._cursors.items() if job_id != ALL}

    def publish(self, job_id: str, seq: int, message: Message, to_job: bool = True) -> None:
        """Hand on ``job_id``'s news number ``seq``, once to each subscriber: to the job's (``to_job``;
        news at or before its cursor is dropped) and, but previews, to ``ALL``'s (news at or before
        where they started, or handed on already, is dropped)."""
        with self._lock:
            queues = []
            if to_job and seq > self._cursors.get(job_id, seq):
                self._cursors[job_id] = seq
                queues += [(queue, message) for queue in self._subscribers.get(job_id, ())]
            if message["type"] != "preview" and self._new_to_all(seq):
                queues += [(queue, {**message, "id": job_id}) for queue in self._subscribers.get(ALL, ())]
        loop = self._loop
        if loop is None or loop.is_closed() or not queues:
            return
        for queue, item in queues:
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _new_to_all(self, seq: int) -> bool:
        """Whether ``ALL``'s subscribers are still to have news ``seq`` (now they have); under the lock."""
        if ALL not in self._cursors or seq <= self._all_start or seq in self._seen:
            return False
        now = time.monotonic()
        self._seen = {number: when for number, when in self._seen.items() if now - when < SEEN_SECONDS}
        self._seen[seq] = now
        self._cursors[ALL] = max(self._cursors[ALL], seq)
        return True

    def everyone(self) -> tuple[int, int] | None:
        """Where ``ALL``'s subscribers started and their cursor (None: there are none)."""
        with self._lock:
            return None if ALL not in self._cursors else (self._all_start, self._cursors[ALL])


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
