"""The worker never stalls: whatever a job raises fails that job alone, a failing store fails the job
and the worker goes on once the store is back, a corrupt stored row fails that job only, and a job
that hangs shows its age. The application runs in this process with a scripted engine in place of the
real one (no model is loaded), so each fault can be injected exactly."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from stable_cascade.engine import Event, ImageDone, ImageRecord, Job
from stable_cascade.server import ServerConfig, create_app
from stable_cascade.server.shared import Server

DEADLINE = 30.0  # seconds any wait below may take


class Strange(Exception):
    """Not one of the errors a job is expected to raise: a bug, as the worker sees it."""


class ScriptedEngine:
    """Runs a job by its prompt: "explode" raises, "hang" waits for ``release``, "image" makes one image
    (calling ``before_image`` first); anything else finishes at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.before_image: Callable[[], None] = lambda: None

    def run(
        self,
        job: Job,
        image: object,
        *,
        previews: bool,
        cancel: threading.Event | None = None,
        skip: threading.Event | None = None,
    ) -> Iterator[Event]:
        if job.prompt == "explode":
            raise Strange("the engine met something it never expected")
        if job.prompt == "hang":
            assert self.release.wait(DEADLINE), "the test never released the hanging job"
        if job.prompt == "image":
            self.before_image()
            picture = PIL.Image.new("RGB", (8, 8), "white")
            yield ImageDone(0, picture, ImageRecord(job, 0, job.seed, 8, 8))


@pytest.fixture
def app(tmp_path: Path) -> tuple[FastAPI, ScriptedEngine]:
    application = create_app(ServerConfig(model="demo", data=tmp_path / "data", device="cpu"))
    engine = ScriptedEngine()
    application.state.server.workers.engines = [engine]
    return application, engine


def _submit(client: TestClient, prompt: str) -> str:
    answer = client.post("/v1/jobs", json={"prompt": prompt, "seed": 1})
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _wait(client: TestClient, job_id: str, *states: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in (states or ("done", "failed", "cancelled")):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not reach {states or 'a final state'} in {DEADLINE:.0f} s")


def test_a_job_raising_anything_fails_alone_and_the_next_runs(app: tuple[FastAPI, ScriptedEngine]) -> None:
    application, _ = app
    with TestClient(application) as client:  # workers run
        exploded = _wait(client, _submit(client, "explode"))
        assert exploded["state"] == "failed"
        assert exploded["error"] == (  # in the user's words: no exception class names
            "the server met an unexpected error (the engine met something it never expected); its log "
            "has the details"
        )
        assert _wait(client, _submit(client, "fine"))["state"] == "done"


def test_a_failing_store_fails_the_job_and_the_worker_goes_on_once_it_is_back(
    app: tuple[FastAPI, ScriptedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    application, engine = app
    server: Server = application.state.server
    broken, failures = threading.Event(), []
    transaction = server.store._transaction

    def flaky() -> AbstractContextManager[sqlite3.Connection]:
        if broken.is_set() and threading.current_thread().name.startswith("worker"):
            failures.append(time.monotonic())
            raise sqlite3.OperationalError("disk I/O error")
        return transaction()

    monkeypatch.setattr(server.store, "_transaction", flaky)
    engine.before_image = broken.set  # the disk fails just as the job's image is being recorded
    with TestClient(application) as client:  # workers run
        first = _submit(client, "image")
        waiting = _submit(client, "fine")
        deadline = time.monotonic() + DEADLINE
        while len(failures) < 3:  # recording the image, then recording the failure, again and again
            assert time.monotonic() < deadline, "the worker stopped trying"
            time.sleep(0.02)
        assert client.get(f"/v1/jobs/{first}").json()["state"] == "running"  # not recorded yet
        engine.before_image = lambda: None
        broken.clear()  # storage is back
        failed = _wait(client, first)
        assert failed["state"] == "failed" and failed["error"] == "disk I/O error"
        assert _wait(client, waiting)["state"] == "done"
        assert _wait(client, _submit(client, "image"))["images"][0]["n"] == 0


def test_a_corrupt_stored_row_fails_that_job_only(app: tuple[FastAPI, ScriptedEngine]) -> None:
    application, _ = app
    server: Server = application.state.server
    client = TestClient(application)  # outside ``with``: the workers have not started
    ids = [_submit(client, f"job {i}") for i in range(5)]
    corrupt = {ids[1]: "{not json", ids[2]: "[1, 2]", ids[3]: '{"prompt": 5}'}
    with sqlite3.connect(server.config.data / "jobs.sqlite3") as db:
        for job_id, text in corrupt.items():
            db.execute("UPDATE jobs SET job = ? WHERE id = ?", (text, job_id))
    listed = client.get("/v1/jobs")
    assert listed.status_code == 200 and len(listed.json()["jobs"]) == 5, listed.text
    with TestClient(application) as running:  # workers run
        jobs = [_wait(running, job_id) for job_id in ids]
    assert [job["state"] for job in jobs] == ["done", "failed", "failed", "failed", "done"]
    assert "the stored job is corrupt" in jobs[1]["error"] and "not an object" in jobs[2]["error"]
    assert "prompt must be text" in jobs[3]["error"]


def test_a_hanging_job_shows_its_age(app: tuple[FastAPI, ScriptedEngine]) -> None:
    application, engine = app
    with TestClient(application) as client:  # workers run
        hanging = _submit(client, "hang")
        queued = _submit(client, "fine")
        _wait(client, hanging, "running")
        time.sleep(0.3)
        shown = client.get(f"/v1/jobs/{hanging}").json()
        assert shown["running_seconds"] >= 0.3 and shown["age_seconds"] >= shown["running_seconds"]
        listed = {job["id"]: job for job in client.get("/v1/jobs").json()["jobs"]}
        assert listed[hanging]["running_seconds"] >= shown["running_seconds"]
        assert listed[queued]["running_seconds"] is None and listed[queued]["age_seconds"] > 0
        engine.release.set()
        done = _wait(client, hanging)
        assert done["state"] == "done" and done["running_seconds"] == pytest.approx(
            done["finished"] - done["started"], abs=0.01
        )


def test_requests_get_503_while_the_store_fails(
    app: tuple[FastAPI, ScriptedEngine], monkeypatch: pytest.MonkeyPatch
) -> None:
    application, _ = app
    server: Server = application.state.server

    def locked(*args: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(server.store, "recent", locked)
    answer = TestClient(application).get("/v1/jobs")
    assert answer.status_code == 503, answer.text
    assert answer.json()["detail"] == "the job store is unavailable (database is locked); try again shortly"
