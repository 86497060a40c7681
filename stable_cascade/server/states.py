"""What the job store holds, as the rest of the server sees it: a job's states, a stored job and its
images, a running job's live progress, and the workers."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from stable_cascade.server.database import Row

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINAL_STATES = (DONE, FAILED, CANCELLED)


class QueueFull(Exception):
    """The queue holds its maximum of waiting jobs (the server answers 429)."""


@dataclasses.dataclass(frozen=True)
class StoredImage:
    n: int
    seed: int
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
    priority: int
    worker: str | None  # the worker that holds (or last held) it
    cancel: bool  # cancelling was asked while it ran


@dataclasses.dataclass(frozen=True)
class Live:
    """Where a running job is: its last step and Stage C preview (PNG bytes)."""

    started: float  # seconds since the epoch
    fraction: float = 0.0
    stage: str = ""
    step: int = 0
    steps: int = 0
    preview: bytes | None = None
    skipping: bool = False  # skipping the image (batch) being made was asked

    def eta(self) -> float:
        """Seconds until the job is done, from its pace so far (0 before the first step)."""
        if self.fraction <= 0.0:
            return 0.0
        elapsed = max(0.0, time.time() - self.started)
        return elapsed / self.fraction * (1.0 - self.fraction)


@dataclasses.dataclass(frozen=True)
class WorkerInfo:
    """A worker as ``GET /v1/workers`` shows it."""

    id: str
    kind: str  # "serve" (a thread of a server) or "worker" (a process of its own)
    host: str
    pid: int
    device: str
    models: list[str]  # those it keeps warm
    job: str | None  # the job it runs
    started: float
    heartbeat: float
    heartbeat_age: float  # seconds since its last heartbeat (the store's clock)
    stopped: float | None


def stored_job(row: Row) -> StoredJob:
    """A stored job; a corrupt one shows as ``{}`` (its error says why once a worker reaches it)."""
    values = {field.name: row[field.name] for field in dataclasses.fields(StoredJob)}
    job = {} if unreadable(row["job"]) else json.loads(row["job"])
    return StoredJob(**(values | {"job": job, "cancel": bool(row["cancel"])}))


def unreadable(stored: object) -> str | None:
    """Why a stored job's JSON cannot be read (None when it can)."""
    try:
        job = json.loads(stored)  # type: ignore[arg-type]  # a corrupt row may hold anything
    except (TypeError, ValueError, RecursionError) as error:
        return f"the stored job is corrupt ({' '.join(str(error).split())}); submit it again"
    if not isinstance(job, dict):
        return f"the stored job is corrupt (a {type(job).__name__}, not an object); submit it again"
    return None
