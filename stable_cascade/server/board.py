"""The store's notice board: the live news of running jobs and the workers that run them, shared by
every process on the store.

A worker posts each event of a job (``started``, ``loading``, ``progress``, ``preview``, ``image``, and
the final state) as a row of ``events`` and notifies :data:`EVENTS`; an API process (any replica) hands
the rows after each subscriber's cursor to its event streams (:mod:`stable_cascade.server.relay`). Rows
are kept :data:`EVENTS_KEPT` seconds. Each worker has a row in ``workers``, renewed with its heartbeat,
which also renews the lease of the job it runs and brings back whether cancelling was asked.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import socket
import uuid
from collections.abc import Iterable, Mapping
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from stable_cascade.server.database import Database, Tx
from stable_cascade.server.hub import ALL
from stable_cascade.server.states import RUNNING, Live, WorkerInfo

EVENTS = "stable_cascade_events"  # payload: the job's id
JOBS = "stable_cascade_jobs"  # a job was queued (or queued again): idle workers look
EVENTS_KEPT = 300.0  # seconds
WORKERS_KEPT = 86400.0  # seconds a stopped or silent worker stays listed
_QUERY_JOBS = 100  # subscribed jobs per query of their events
_EVERYONES_ROWS = 1000  # news items per query of every job's
LATE_SECONDS = 5.0  # news is looked for again this long (a writer may commit it after later news)


def add_event(tx: Tx, job_id: str, message: Mapping[str, Any]) -> None:
    """Post ``message`` (with its ``type``) to ``job_id``'s news, within ``tx``."""
    tx.run(
        "INSERT INTO events (job, type, data, created) VALUES (?, ?, ?, {now})",
        (job_id, message["type"], json.dumps(message)),
    )
    tx.notify(EVENTS, job_id)


def process_space() -> str:
    """Which processes can see each other's ids: this boot of this machine and this pid namespace
    (different for every process where it cannot be told, so no process is judged by its id)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return f"{socket.gethostname()}/{uuid.uuid4().hex}"


@dataclasses.dataclass(frozen=True)
class Orders:
    """What a running job's worker is asked, as it posts the job's news."""

    stop: bool = False  # cancelled, or taken from it
    skip: bool = False  # skip the image (batch) it makes


class Board:
    """Events and workers (the job store's base: see :class:`~stable_cascade.server.store.Store`)."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.space = process_space()

    def _transaction(self) -> AbstractContextManager[Tx]:
        return self.db.transaction()

    def post(self, job_id: str, message: Mapping[str, Any], worker: str | None = None) -> Orders:
        """Post a running job's news; what its worker is asked: to stop (once the job was taken from
        ``worker`` — its lease expired — or cancelling was asked) or to skip the image it makes."""
        with self.db.transaction(durable=False) as tx:
            orders = Orders()
            if worker is not None:
                row = tx.one(
                    "SELECT cancel, skip FROM jobs WHERE id = ? AND state = ? AND worker = ?",
                    (job_id, RUNNING, worker),
                )
                if row is None:
                    return Orders(stop=True)
                orders = Orders(stop=bool(row["cancel"]), skip=bool(row["skip"]))
                if orders.skip:
                    tx.run("UPDATE jobs SET skip = 0 WHERE id = ?", (job_id,))
            add_event(tx, job_id, message)
        return orders

    def last_event(self, job_id: str) -> int:
        """The sequence number of ``job_id``'s latest news (``ALL``: anyone's; 0: none yet)."""
        with self.db.read() as tx:
            if job_id == ALL:
                row = tx.one("SELECT MAX(seq) AS seq FROM events")
            else:
                row = tx.one("SELECT MAX(seq) AS seq FROM events WHERE job = ?", (job_id,))
        return int(row["seq"] or 0) if row else 0

    def everyones_events(self, start: int, cursor: int) -> list[tuple[str, int, dict[str, Any]]]:
        """Every job's news but previews after ``cursor``, and that of the last :data:`LATE_SECONDS`
        after ``start`` (news may be committed out of the order of its numbers), oldest first."""
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT job, seq, data FROM events WHERE type <> 'preview' AND seq > ? "
                "AND (seq > ? OR created > {now} - ?) ORDER BY seq LIMIT ?",
                (start, cursor, LATE_SECONDS, _EVERYONES_ROWS),
            )
        return [(row["job"], int(row["seq"]), json.loads(row["data"])) for row in rows]

    def events_after(self, cursors: Mapping[str, int]) -> list[tuple[str, int, dict[str, Any]]]:
        """Each job's news after its cursor, oldest first: (job, seq, message)."""
        items = list(cursors.items())
        found: list[tuple[str, int, dict[str, Any]]] = []
        for start in range(0, len(items), _QUERY_JOBS):
            chunk = items[start : start + _QUERY_JOBS]
            where = " OR ".join("(job = ? AND seq > ?)" for _ in chunk)
            with self.db.read() as tx:
                rows = tx.rows(
                    f"SELECT job, seq, data FROM events WHERE {where} ORDER BY seq",
                    [value for pair in chunk for value in pair],
                )
            found += [(row["job"], int(row["seq"]), json.loads(row["data"])) for row in rows]
        return sorted(found, key=lambda item: item[1])

    def live(self, job_id: str) -> Live | None:
        """Where the running job ``job_id`` is (None when it is not running)."""
        with self.db.read() as tx:
            job = tx.one("SELECT started, skip FROM jobs WHERE id = ? AND state = ?", (job_id, RUNNING))
            if job is None:
                return None
            latest = {}
            for kind in ("progress", "preview"):
                row = tx.one(
                    "SELECT data FROM events WHERE job = ? AND type = ? AND seq > COALESCE((SELECT "
                    "MAX(seq) FROM events WHERE job = ? AND type = 'started'), 0) ORDER BY seq DESC LIMIT 1",
                    (job_id, kind, job_id),
                )
                latest[kind] = {} if row is None else json.loads(row["data"])
        progress, preview = latest["progress"], latest["preview"]
        return Live(
            started=float(job["started"]),
            fraction=float(progress.get("fraction", 0.0)),
            stage=str(progress.get("stage", "")),
            step=int(progress.get("step", 0)),
            steps=int(progress.get("steps", 0)),
            preview=base64.b64decode(preview["image"]) if "image" in preview else None,
            skipping=bool(job["skip"]),
        )

    def current(self) -> tuple[str, Live] | None:
        """The running job that started last, and where it is."""
        with self.db.read() as tx:
            row = tx.one("SELECT id FROM jobs WHERE state = ? ORDER BY started DESC LIMIT 1", (RUNNING,))
        live = None if row is None else self.live(row["id"])
        return None if row is None or live is None else (row["id"], live)

    def register(self, kind: str, device: str, models: Iterable[str]) -> str:
        """A new worker's id, listed with this process's host and pid."""
        worker_id = uuid.uuid4().hex
        with self._transaction() as tx:
            tx.run(
                "INSERT INTO workers (id, kind, host, space, pid, device, models, started, heartbeat) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, {now}, {now})",
                (
                    worker_id,
                    kind,
                    socket.gethostname(),
                    self.space,
                    os.getpid(),
                    device,
                    json.dumps(list(models)),
                ),
            )
        return worker_id

    def heartbeat(self, holding: Mapping[str, str | None], lease: float) -> dict[str, bool]:
        """Renew each worker's heartbeat (``holding``: worker → the job it runs) and its job's lease;
        for each job still held, whether cancelling was asked (a job missing was taken from it)."""
        held: dict[str, bool] = {}
        with self.db.transaction(durable=False) as tx:
            for worker, job_id in holding.items():
                tx.run("UPDATE workers SET heartbeat = {now}, job = ? WHERE id = ?", (job_id, worker))
                if job_id is None:
                    continue
                row = tx.one(
                    "UPDATE jobs SET lease_until = {now} + ? WHERE id = ? AND state = ? AND worker = ? "
                    "RETURNING cancel",
                    (lease, job_id, RUNNING, worker),
                )
                if row is not None:
                    held[job_id] = bool(row["cancel"])
        return held

    def worker_stopped(self, worker_id: str) -> None:
        with self._transaction() as tx:
            tx.run("UPDATE workers SET stopped = {now}, job = NULL WHERE id = ?", (worker_id,))

    def workers(self) -> list[WorkerInfo]:
        """The workers running (and those silent for less than :data:`WORKERS_KEPT`), oldest first."""
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT *, {now} - heartbeat AS heartbeat_age FROM workers "
                "WHERE stopped IS NULL AND heartbeat > {now} - ? ORDER BY started",
                (WORKERS_KEPT,),
            )
        return [
            WorkerInfo(
                **{key: row[key] for key in ("id", "kind", "host", "pid", "device", "job", "started")},
                models=json.loads(row["models"]),
                heartbeat=float(row["heartbeat"]),
                heartbeat_age=round(max(0.0, float(row["heartbeat_age"])), 3),
                stopped=row["stopped"],
            )
            for row in rows
        ]

    def prune(self) -> None:
        """Forget old news and long-gone workers."""
        with self.db.transaction(durable=False) as tx:
            tx.run("DELETE FROM events WHERE created < {now} - ?", (EVENTS_KEPT,))
            tx.run("DELETE FROM workers WHERE COALESCE(stopped, heartbeat) < {now} - ?", (WORKERS_KEPT,))
