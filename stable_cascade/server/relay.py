"""The relay: brings the news of subscribed jobs from the store to this process's :class:`Hub`, so an
event stream (or a waiting A1111 request) on any API replica follows a job run by any worker.

It wakes on the store's notifications (PostgreSQL ``NOTIFY``; on SQLite, this process's own workers)
and looks every :data:`POLL_SECONDS` besides, which is all it has for workers in other processes on
SQLite, or while PostgreSQL's notifications are lost (a connection reopening).
"""

from __future__ import annotations

import logging
import threading

from stable_cascade.server.board import EVENTS
from stable_cascade.server.hub import Hub
from stable_cascade.server.store import STORAGE_ERRORS, Store

logger = logging.getLogger(__name__)
POLL_SECONDS = 0.25


class Relay:
    """A thread handing the store's news of subscribed jobs to the hub."""

    def __init__(self, store: Store, hub: Hub) -> None:
        self.store = store
        self.hub = hub
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stopping.clear()
        self._thread = threading.Thread(target=self._loop, name="relay", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        listener = self.store.db.listen(EVENTS)
        failing = False
        try:
            while not self._stopping.is_set():
                listener.wait(POLL_SECONDS)
                cursors, everyone = self.hub.cursors(), self.hub.everyone()
                if not cursors and everyone is None:
                    continue
                try:
                    news = self.store.events_after(cursors) if cursors else []
                    others = [] if everyone is None else self.store.everyones_events(*everyone)
                except STORAGE_ERRORS as error:
                    if not failing:
                        logger.warning("the relay cannot read the job store (%s); trying again", error)
                    failing = True
                    continue
                failing = False
                for job_id, seq, message in news:
                    self.hub.publish(job_id, seq, message)
                for job_id, seq, message in others:  # the jobs' own subscribers had theirs above
                    self.hub.publish(job_id, seq, message, to_job=False)
        finally:
            listener.close()
