"""The durable queue: jobs and their state in SQLite (write-ahead log), images as files beside it.

Everything a client was told is on disk before it is told: a job is committed before its id is
returned, an image is written (to a temporary name, synced, then renamed) and recorded before the job
reports it. A server killed at any moment and restarted on the same folder therefore finds every job
that was queued or running (:meth:`Store.recover` queues the running ones again, in their original
place) and every finished image.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)
MAX_ATTEMPTS = 3  # a job whose runs killed the server this often is given up
DATABASE = "jobs.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT UNIQUE NOT NULL,
    state TEXT NOT NULL,
    job TEXT NOT NULL,
    input TEXT,
    error TEXT,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    attempts INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, seq);
CREATE TABLE IF NOT EXISTS images (
    job TEXT NOT NULL,
    n INTEGER NOT NULL,
    seed INTEGER NOT NULL,
    file TEXT NOT NULL,
    infotext TEXT NOT NULL,
    PRIMARY KEY (job, n)
);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs (the server answers 429)."""


@dataclasses.dataclass(frozen=True)
class StoredImage:
    n: int
    seed: int
    file: Path
    infotext: str


@dataclasses.dataclass(frozen=True)
class StoredJob:
    id: str
    seq: int
    state: str
    job: dict[str, Any]  # the Job's to_dict()
    input: str | None  # the input image's file name under inputs/
    error: str | None
    created: float
    started: float | None
    finished: float | None
    attempts: int


class Store:
    """Jobs, images and settings under ``folder`` (created when missing); safe to share between threads."""

    def __init__(self, folder: Path, max_queue: int) -> None:
        self.folder = Path(folder)
        self.images_dir = self.folder / "images"
        self.inputs_dir = self.folder / "inputs"
        for path in (self.folder, self.images_dir, self.inputs_dir):
            path.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._db = _open(self.folder / DATABASE)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def add(self, job: dict[str, Any], input_name: str | None = None) -> StoredJob:
        """Queue ``job`` at the end; ``QueueFull`` when ``max_queue`` jobs are already waiting."""
        job_id = uuid.uuid4().hex
        with self._transaction() as db:
            (waiting,) = db.execute("SELECT COUNT(*) FROM jobs WHERE state = ?", (QUEUED,)).fetchone()
            if waiting >= self.max_queue:
                raise QueueFull(f"the queue is full ({waiting} jobs waiting); try again later")
            db.execute(
                "INSERT INTO jobs (id, state, job, input, created) VALUES (?, ?, ?, ?, ?)",
                (job_id, QUEUED, json.dumps(job, sort_keys=True), input_name, time.time()),
            )
        stored = self.get(job_id)
        assert stored is not None
        return stored

    def recover(self) -> int:
        """Queue again (in their original place) the jobs a stopped server was running; how many."""
        for leftover in [*self.images_dir.glob("*/.*.partial.png"), *self.inputs_dir.glob(".*")]:
            leftover.unlink()  # files a killed server was writing
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, started = NULL WHERE state = ?", (QUEUED, RUNNING)
            )
            return cursor.rowcount

    def claim(self) -> StoredJob | None:
        """The oldest queued job, now marked running; None when none waits. Jobs that cannot run are
        failed on the way: those given up (see :data:`MAX_ATTEMPTS`) and those whose stored row is
        corrupt."""
        while True:
            with self._transaction() as db:
                row = db.execute(
                    "SELECT id, attempts, job FROM jobs WHERE state = ? ORDER BY seq LIMIT 1", (QUEUED,)
                ).fetchone()
                if row is None:
                    return None
                problem = _unreadable(row["job"])
                if problem is None and row["attempts"] >= MAX_ATTEMPTS:
                    problem = f"the server stopped during each of this job's {MAX_ATTEMPTS} runs; given up"
                if problem is not None:
                    db.execute(
                        "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?",
                        (FAILED, problem, time.time(), row["id"]),
                    )
                    continue
                db.execute(
                    "UPDATE jobs SET state = ?, started = ?, attempts = attempts + 1 WHERE id = ?",
                    (RUNNING, time.time(), row["id"]),
                )
            return self.get(row["id"])

    def finish(self, job_id: str, state: str, error: str | None = None) -> None:
        assert state in FINAL_STATES, state
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?",
                (state, error, time.time(), job_id),
            )

    def cancel_queued(self, job_id: str) -> bool:
        """Cancel ``job_id`` if it is still waiting; whether it was."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE jobs SET state = ?, finished = ? WHERE id = ? AND state = ?",
                (CANCELLED, time.time(), job_id, QUEUED),
            )
            return cursor.rowcount == 1

    def delete(self, job_id: str) -> bool:
        """Forget a finished job and remove its images; whether there was one (queued and running jobs
        are not deleted: cancel them first)."""
        with self._transaction() as db:
            cursor = db.execute(
                f"DELETE FROM jobs WHERE id = ? AND state IN ({', '.join('?' for _ in FINAL_STATES)})",
                (job_id, *FINAL_STATES),
            )
            if cursor.rowcount != 1:
                return False
            db.execute("DELETE FROM images WHERE job = ?", (job_id,))
        folder = self.images_dir / job_id
        if folder.is_dir():
            for image in folder.iterdir():
                image.unlink(missing_ok=True)
            folder.rmdir()
        return True

    def write_image(
        self, job_id: str, n: int, seed: int, infotext: str, write: Callable[[Path], None]
    ) -> Path:
        """Write image ``n`` of a job with ``write(temporary path)``, atomically, and record it."""
        folder = self.images_dir / job_id
        folder.mkdir(exist_ok=True)
        path = folder / f"{n}.png"
        temporary = folder / f".{n}.partial.png"
        write(temporary)
        with temporary.open("rb") as file:
            os.fsync(file.fileno())
        os.replace(temporary, path)
        _sync_folder(folder)
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO images (job, n, seed, file, infotext) VALUES (?, ?, ?, ?, ?)",
                (job_id, n, seed, str(path.relative_to(self.folder)), infotext),
            )
        return path

    def get(self, job_id: str) -> StoredJob | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else _job(row)

    def images(self, job_id: str) -> list[StoredImage]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM images WHERE job = ? ORDER BY n", (job_id,)).fetchall()
        return [
            StoredImage(row["n"], row["seed"], self.folder / row["file"], row["infotext"]) for row in rows
        ]

    def recent(self, limit: int, before: int | None = None) -> list[StoredJob]:
        """Up to ``limit`` jobs, newest first (those older than sequence number ``before``)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM jobs WHERE seq < ? ORDER BY seq DESC LIMIT ?",
                (2**62 if before is None else before, limit),
            ).fetchall()
        return [_job(row) for row in rows]

    def position(self, job: StoredJob) -> int:
        """How many queued jobs run before ``job``."""
        with self._lock:
            (ahead,) = self._db.execute(
                "SELECT COUNT(*) FROM jobs WHERE state = ? AND seq < ?", (QUEUED, job.seq)
            ).fetchone()
        return int(ahead)

    def count(self, *states: str) -> int:
        marks = ", ".join("?" for _ in states)
        with self._lock:
            (total,) = self._db.execute(
                f"SELECT COUNT(*) FROM jobs WHERE state IN ({marks})", states
            ).fetchone()
        return int(total)

    def setting(self, key: str) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row["value"])

    def set_setting(self, key: str, value: str) -> None:
        with self._transaction() as db:
            db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))


def _open(path: Path) -> sqlite3.Connection:
    """The job database at ``path`` (created when missing), checked readable: a one-line
    ``ValueError`` for a file that is not one, or is truncated or corrupt."""
    db = None
    try:
        db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        problems = [row[0] for row in db.execute("PRAGMA quick_check").fetchall()]
        if problems != ["ok"]:
            raise sqlite3.DatabaseError(f"database disk image is malformed: {'; '.join(problems[:3])}")
        db.executescript(_SCHEMA)
    except sqlite3.DatabaseError as error:
        if db is not None:
            db.close()
        raise ValueError(
            f"{path} is not a readable job database ({' '.join(str(error).split())}); move it (and "
            f"{path.name}-wal, {path.name}-shm) elsewhere to start with an empty queue, or restore a backup"
        ) from None
    return db


def _unreadable(stored: object) -> str | None:
    """Why a stored job's JSON cannot be read (None when it can)."""
    try:
        job = json.loads(stored)  # type: ignore[arg-type]  # a corrupt row may hold anything
    except (TypeError, ValueError, RecursionError) as error:
        return f"the stored job is corrupt ({' '.join(str(error).split())}); submit it again"
    if not isinstance(job, dict):
        return f"the stored job is corrupt (a {type(job).__name__}, not an object); submit it again"
    return None


def _job(row: sqlite3.Row) -> StoredJob:
    """A stored job; a corrupt one shows as ``{}`` (its error says why once a worker reaches it)."""
    values = {field.name: row[field.name] for field in dataclasses.fields(StoredJob)}
    job = {} if _unreadable(row["job"]) else json.loads(row["job"])
    return StoredJob(**(values | {"job": job}))


def _sync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (where the system allows opening folders)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
