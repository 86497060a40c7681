"""The durable queue: jobs, their leases, images and settings, in SQLite (a data folder, one host) or in
PostgreSQL (``url``: many hosts), with the same semantics on both.

Everything a client was told is in the database before it is told: a job is committed before its id
is returned, an image (its PNG bytes and record) before the job reports it. A worker claims the queued
job of highest priority, oldest first, and holds it under a lease it renews with its heartbeats
(:class:`~stable_cascade.server.board.Board`). A job whose lease ran out — its worker was killed, its
host lost — goes back to the queue in its original place (:meth:`Store.reap`); after
:data:`MAX_ATTEMPTS` runs it fails with the reason. Images are keyed by job and index, so a job that
ran twice never has an image twice. Uploads (the input and control images) are files under the data
folder's ``inputs/``; on PostgreSQL they also go into the database with their job, and a worker on
another host fetches them from there (:meth:`Store.input_file`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from stable_cascade.server import schema
from stable_cascade.server.board import JOBS, Board, add_event
from stable_cascade.server.database import Database, StoreError, Tx, open_sqlite
from stable_cascade.server.states import (
    CANCELLED,
    DONE,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    QueueFull,
    StoredImage,
    StoredJob,
    stored_job,
    unreadable,
)

__all__ = [
    "CANCELLED",
    "DONE",
    "FAILED",
    "FINAL_STATES",
    "QUEUED",
    "RUNNING",
    "QueueFull",
    "Store",
    "StoreError",
    "StoredImage",
    "StoredJob",
]
logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # a job whose runs stopped its worker this often is given up
GIVEN_UP = (
    f"its worker stopped (killed, or its lease lost) during each of this job's {MAX_ATTEMPTS} runs; given up"
)
LEASE_SECONDS = 15.0  # how long a claim holds without a heartbeat
DATABASE = "jobs.sqlite3"
STALE_UPLOAD_SECONDS = 3600.0  # a temporary upload file this old was left by a killed process
#: What the store raises when its disk or database fails.
STORAGE_ERRORS = (sqlite3.Error, OSError, StoreError)
_EXPIRED = "state = ? AND (lease_until IS NULL OR lease_until < {now})"


def is_url(store: str) -> bool:
    """Whether ``--store`` names a PostgreSQL database (else it is a data folder)."""
    return store.startswith(("postgresql://", "postgres://"))


class Store(Board):
    """Jobs, images and settings (:class:`Board`: live news and workers); safe to share between
    threads. ``folder``: the data folder (SQLite: the store itself; PostgreSQL: this host's uploads)."""

    def __init__(self, folder: Path, max_queue: int, url: str | None = None) -> None:
        self.folder = Path(folder)
        self.inputs_dir = self.folder / "inputs"
        for path in (self.folder, self.inputs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self.local = url is None
        super().__init__(open_sqlite(self.folder / DATABASE) if url is None else _postgres(url))
        self.where = self.db.where
        self.holder = uuid.uuid4().hex  # the claims of a caller that names no worker
        try:
            with self._transaction() as tx:
                schema.migrate(tx, self.db.dialect, self.where)
        except BaseException:
            self.db.close()
            raise

    def close(self) -> None:
        self.db.close()

    def add(
        self,
        job: dict[str, Any],
        input_name: str | None = None,
        priority: int = 0,
        inputs: Iterable[str] = (),
    ) -> StoredJob:
        """Queue ``job`` in its ``priority``'s turn; ``QueueFull`` when ``max_queue`` jobs are waiting.
        ``inputs``: the uploads it uses besides ``input_name`` (names under inputs/)."""
        job_id = uuid.uuid4().hex
        names = sorted({*inputs, *([input_name] if input_name else [])})
        uploads = [] if self.local else [(name, (self.inputs_dir / name).read_bytes()) for name in names]
        with self._transaction() as tx:
            row = tx.one("SELECT COUNT(*) AS waiting FROM jobs WHERE state = ?", (QUEUED,))
            waiting = int(row["waiting"]) if row else 0
            if waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting); try again later")
            for name, data in uploads:
                tx.run(
                    "INSERT INTO inputs (name, png, created) VALUES (?, ?, {now}) "
                    "ON CONFLICT (name) DO NOTHING",
                    (name, data),
                )
            tx.run(
                "INSERT INTO jobs (id, state, job, input, created, priority) VALUES (?, ?, ?, ?, {now}, ?)",
                (job_id, QUEUED, json.dumps(job, sort_keys=True), input_name, priority),
            )
            add_event(tx, job_id, {"type": QUEUED, "position": None})
            tx.notify(JOBS)
        stored = self.get(job_id)
        assert stored is not None
        return stored

    def claim(self, worker: str | None = None, lease: float = LEASE_SECONDS) -> StoredJob | None:
        """The queued job of highest priority (oldest first), now running under ``worker``'s lease of
        ``lease`` seconds; None when none waits. Jobs that cannot run are failed on the way: those given
        up (see :data:`MAX_ATTEMPTS`) and those whose stored row is corrupt."""
        holder = worker or self.holder
        while True:
            with self._transaction() as tx:
                row = tx.one(
                    "SELECT id, attempts, job FROM jobs WHERE state = ? "
                    "ORDER BY priority DESC, seq LIMIT 1{skip_locked}",
                    (QUEUED,),
                )
                if row is None:
                    return None
                problem = unreadable(row["job"])
                if problem is None and row["attempts"] >= MAX_ATTEMPTS:
                    problem = GIVEN_UP
                if problem is not None:
                    self._end(tx, row["id"], FAILED, problem)
                    continue
                tx.run(
                    "UPDATE jobs SET state = ?, started = {now}, attempts = attempts + 1, worker = ?, "
                    "lease_until = {now} + ?, cancel = 0, skip = 0 WHERE id = ?",
                    (RUNNING, holder, lease, row["id"]),
                )
                tx.run("UPDATE workers SET job = ? WHERE id = ?", (row["id"], holder))
                add_event(tx, row["id"], {"type": "started"})
            return self.get(row["id"])

    def finish(self, job_id: str, state: str, error: str | None = None, worker: str | None = None) -> bool:
        """Record the end of a running job (only if ``worker``, when given, still holds it); whether it
        was recorded."""
        assert state in FINAL_STATES, state
        with self._transaction() as tx:
            if worker is not None:
                held = tx.one(
                    "SELECT id FROM jobs WHERE id = ? AND state = ? AND worker = ?", (job_id, RUNNING, worker)
                )
                if held is None:
                    return False
                tx.run("UPDATE workers SET job = NULL WHERE id = ?", (worker,))
            self._end(tx, job_id, state, error)
        return True

    def release(self, job_id: str, worker: str) -> None:
        """Queue a running job again in its place, this run not counted (its worker stops cleanly); a job
        whose cancelling was asked ends cancelled instead."""
        with self._transaction() as tx:
            held = tx.one(
                "SELECT cancel FROM jobs WHERE id = ? AND state = ? AND worker = ?", (job_id, RUNNING, worker)
            )
            tx.run("UPDATE workers SET job = NULL WHERE id = ?", (worker,))
            if held is None:
                return
            if held["cancel"]:
                self._end(tx, job_id, CANCELLED, None)
                return
            tx.run(
                "UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, started = NULL, "
                "attempts = attempts - 1 WHERE id = ?",
                (QUEUED, job_id),
            )
            add_event(tx, job_id, {"type": QUEUED, "position": None})
            tx.notify(JOBS)

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel ``job_id`` if it is still waiting; whether it was."""
        with self._transaction() as tx:
            if tx.one("SELECT id FROM jobs WHERE id = ? AND state = ?", (job_id, QUEUED)) is None:
                return False
            self._end(tx, job_id, CANCELLED, None)
        return True

    def cancel_running(self, job_id: str | None = None) -> int:
        """Ask the worker of ``job_id`` (of every running job: None) to stop after its current step;
        how many jobs were asked."""
        with self._transaction() as tx:
            if job_id is None:
                return tx.run("UPDATE jobs SET cancel = 1 WHERE state = ?", (RUNNING,))
            return tx.run("UPDATE jobs SET cancel = 1 WHERE state = ? AND id = ?", (RUNNING, job_id))

    def skip_running(self) -> int:
        """Ask the worker of every running job to skip the image (batch) it makes; how many jobs."""
        with self._transaction() as tx:
            return tx.run("UPDATE jobs SET skip = 1 WHERE state = ?", (RUNNING,))

    def delete(self, job_id: str) -> bool:
        """Forget a finished job and its images; whether there was one (queued and running jobs are not
        deleted: cancel them first)."""
        finals = ", ".join("?" for _ in FINAL_STATES)
        with self._transaction() as tx:
            if not tx.run(f"DELETE FROM jobs WHERE id = ? AND state IN ({finals})", (job_id, *FINAL_STATES)):
                return False
            tx.run("DELETE FROM images WHERE job = ?", (job_id,))
            add_event(tx, job_id, {"type": "deleted"})
        shutil.rmtree(self.folder / "images" / job_id, ignore_errors=True)  # written before version 2
        return True

    def reap(self) -> int:
        """Queue again (in their place) the running jobs whose lease ran out or whose worker, on this
        host, is gone; those cancelled meanwhile end cancelled, those run :data:`MAX_ATTEMPTS` times
        fail. How many were queued again."""
        with self._transaction() as tx:
            holders = tx.rows(
                "SELECT jobs.id AS job, workers.id AS worker, workers.pid AS pid FROM jobs JOIN workers "
                "ON workers.id = jobs.worker WHERE jobs.state = ? AND workers.space = ?",
                (RUNNING, self.space),
            )
            for gone in (row for row in holders if not _alive(int(row["pid"]))):
                tx.run("UPDATE jobs SET lease_until = NULL WHERE id = ?", (gone["job"],))
                tx.run("UPDATE workers SET stopped = {now}, job = NULL WHERE id = ?", (gone["worker"],))
            for row in tx.rows(f"SELECT id FROM jobs WHERE {_EXPIRED} AND cancel = 1", (RUNNING,)):
                self._end(tx, row["id"], CANCELLED, None)
            for row in tx.rows(
                f"SELECT id FROM jobs WHERE {_EXPIRED} AND attempts >= ?", (RUNNING, MAX_ATTEMPTS)
            ):
                self._end(tx, row["id"], FAILED, GIVEN_UP)
            queued = tx.rows(
                f"UPDATE jobs SET state = ?, worker = NULL, lease_until = NULL, started = NULL "
                f"WHERE {_EXPIRED} RETURNING id",
                (QUEUED, RUNNING),
            )
            for row in queued:
                add_event(tx, row["id"], {"type": QUEUED, "position": None})
            if queued:
                tx.notify(JOBS)
        if queued:
            logger.info("queued again %d job(s) whose worker stopped", len(queued))
        return len(queued)

    def recover(self, exclusive: bool | None = None) -> int:
        """At a server's start: :meth:`reap`, and when the server is the store's only one (``exclusive``;
        default: a data folder, which a lock keeps to one server) queue again the jobs its predecessor's
        own workers were running. How many jobs were queued again."""
        cutoff = time.time() - STALE_UPLOAD_SECONDS
        for leftover in self.inputs_dir.glob(".*"):  # files a killed process was writing
            if leftover.stat().st_mtime < cutoff:
                leftover.unlink(missing_ok=True)
        if exclusive if exclusive is not None else self.local:
            with self._transaction() as tx:
                tx.run(
                    "UPDATE jobs SET lease_until = NULL WHERE state = ? AND (worker IS NULL OR worker NOT "
                    "IN (SELECT id FROM workers WHERE kind = 'worker' AND stopped IS NULL))",
                    (RUNNING,),
                )
        return self.reap()

    def write_image(self, job_id: str, n: int, seed: int, infotext: str, png: bytes) -> None:
        """Record image ``n`` of a job (its PNG bytes): once; a second run's image ``n`` is dropped."""
        with self._transaction() as tx:
            added = tx.run(
                "INSERT INTO images (job, n, seed, file, infotext, png) VALUES (?, ?, ?, '', ?, ?) "
                "ON CONFLICT (job, n) DO NOTHING",
                (job_id, n, seed, infotext, png),
            )
            if added:
                add_event(tx, job_id, {"type": "image", "n": n, "seed": seed, "file": f"{n}.png"})

    def get(self, job_id: str) -> StoredJob | None:
        with self.db.read() as tx:
            row = tx.one("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return None if row is None else stored_job(row)

    def images(self, job_id: str) -> list[StoredImage]:
        with self.db.read() as tx:
            rows = tx.rows("SELECT n, seed, infotext FROM images WHERE job = ? ORDER BY n", (job_id,))
        return [StoredImage(int(row["n"]), int(row["seed"]), row["infotext"]) for row in rows]

    def png(self, job_id: str, n: int) -> bytes | None:
        """Image ``n`` of a job as PNG bytes (None when it has none such)."""
        with self.db.read() as tx:
            row = tx.one("SELECT png, file FROM images WHERE job = ? AND n = ?", (job_id, n))
        if row is None:
            return None
        if row["png"] is not None:
            return bytes(row["png"])
        return (self.folder / row["file"]).read_bytes()  # written before version 2: a file

    def input_file(self, name: str) -> Path:
        """The upload ``name`` as a file on this host (fetched from the database when it is not)."""
        path = self.inputs_dir / name
        if path.exists():
            return path
        row = None
        if not self.local:
            with self.db.read() as tx:
                row = tx.one("SELECT png FROM inputs WHERE name = ?", (name,))
        if row is None:
            raise FileNotFoundError(f"the upload {name} is in no store; submit the job again")
        temporary = path.with_name(f".{name}.{uuid.uuid4().hex}.partial")
        temporary.write_bytes(bytes(row["png"]))
        os.replace(temporary, path)
        return path

    def recent(self, limit: int, before: int | None = None) -> list[StoredJob]:
        """Up to ``limit`` jobs, newest first (those older than sequence number ``before``)."""
        with self.db.read() as tx:
            rows = tx.rows(
                "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (2**62 if before is None else before, limit),
            )
        return [stored_job(row) for row in rows]

    def position(self, job: StoredJob) -> int:
        """How many queued jobs run before ``job``."""
        with self.db.read() as tx:
            row = tx.one(
                "SELECT COUNT(*) AS ahead FROM jobs WHERE state = ? AND (priority > ? OR (priority = ? "
                "AND seq < ?))",
                (QUEUED, job.priority, job.priority, job.seq),
            )
        return int(row["ahead"]) if row else 0

    def count(self, *states: str) -> int:
        marks = ", ".join("?" for _ in states)
        with self.db.read() as tx:
            row = tx.one(f"SELECT COUNT(*) AS total FROM jobs WHERE state IN ({marks})", states)
        return int(row["total"]) if row else 0

    def setting(self, key: str) -> str | None:
        with self.db.read() as tx:
            row = tx.one("SELECT value FROM settings WHERE key = ?", (key,))
        return None if row is None else str(row["value"])

    def set_setting(self, key: str, value: str) -> None:
        with self._transaction() as tx:
            tx.run(
                "INSERT INTO settings (key, value) VALUES (?, ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (key, value),
            )

    def _end(self, tx: Tx, job_id: str, state: str, error: str | None) -> None:
        tx.run(
            "UPDATE jobs SET state = ?, error = ?, finished = {now}, lease_until = NULL WHERE id = ?",
            (state, error, job_id),
        )
        add_event(tx, job_id, {"type": state, "error": error})


def _alive(pid: int) -> bool:
    """Whether process ``pid`` (of this host's process space) still runs."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it runs
        return True
    return True


def _postgres(url: str) -> Database:
    try:
        from stable_cascade.server.postgres import PostgresDatabase
    except ImportError:
        raise ValueError(
            "a PostgreSQL store needs psycopg 3 and its pool: pip install 'stable-cascade[postgres]'"
        ) from None
    return PostgresDatabase(url)
