"""Serving from many processes, as real processes on 127.0.0.1 with the demo model: API replicas
(``serve --no-workers``) and ``stable-cascade worker`` processes sharing one job store — a real
PostgreSQL server, and a data folder (SQLite) shared by processes on one host. Jobs submitted to one
replica are run by any worker and served by any replica; a worker or a replica killed with SIGKILL, and
PostgreSQL restarted, lose nothing; every wait is bounded."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import PIL.Image
import pytest
from postgres import cluster
from serving import PROMPT, ServerProcess, WorkerProcess

pytestmark = pytest.mark.slow
LEASE = ("--lease", "3")
SMALL = {"prompt": PROMPT, "prior_steps": 2, "decoder_steps": 2}
FINAL = ("done", "failed", "cancelled")


def _until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """``check()``'s first true value, polled until ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = check()
        except httpx.TransportError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} within {timeout:.0f} s")


def _submit(server: ServerProcess, timeout: float = 30.0, **fields: Any) -> str:
    """A job's id (503s, while the store restarts, are tried again)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = httpx.post(f"{server.url}/v1/jobs", json={**SMALL, **fields}, timeout=30)
        if answer.status_code != 503 or time.monotonic() > deadline:
            assert answer.status_code == 201, answer.text
            return str(answer.json()["id"])
        time.sleep(0.2)


def _job(server: ServerProcess, job_id: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.url}/v1/jobs/{job_id}", timeout=30)
    return answer.json() if answer.status_code == 200 else {"state": f"HTTP {answer.status_code}"}


def _finished(server: ServerProcess, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    return _until(
        lambda: (job := _job(server, job_id))["state"] in FINAL and job, timeout, f"job {job_id} finished"
    )


def _holder(server: ServerProcess, job_id: str, workers: list[WorkerProcess]) -> WorkerProcess | None:
    """The worker process running ``job_id`` (as ``GET /v1/workers`` says)."""
    listed = httpx.get(f"{server.url}/v1/workers", timeout=30).json()["workers"]
    pids = {worker["pid"] for worker in listed if worker["job"] == job_id}
    return next((w for w in workers if w.process is not None and w.process.pid in pids), None)


def _image_seed(server: ServerProcess, url: str) -> int:
    answer = httpx.get(server.url + url, timeout=30)
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/png", answer.text
    return int(json.loads(PIL.Image.open(io.BytesIO(answer.content)).info["stable_cascade"])["seed"])


def _stream(server: ServerProcess, job_id: str, kinds: list[str]) -> threading.Thread:
    """Collect the types of ``job_id``'s events from ``server``'s stream, in a thread."""

    def read() -> None:
        with httpx.stream("GET", f"{server.url}/v1/jobs/{job_id}/events", timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    message = json.loads(line[len("data: ") :])
                    kinds.append(message["type"])
                    if message["type"] == "preview":
                        assert PIL.Image.open(io.BytesIO(base64.b64decode(message["image"]))).size[0] > 0

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    return thread


def _stream_all(server: ServerProcess, seen: list[tuple[str, str]], last: list[str]) -> threading.Thread:
    """Collect (id, type) of every job's events from ``server``'s stream of them, in a thread, until the
    job ``last[0]`` is done; returns once the stream is open."""
    opened = threading.Event()

    def read() -> None:
        with httpx.stream("GET", f"{server.url}/v1/events", timeout=120) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: "):
                    message = json.loads(line[len("data: ") :])
                    opened.set()  # its first message: hello
                    if "id" in message:
                        seen.append((message["id"], message["type"]))
                    if message["type"] == "done" and last and message["id"] == last[0]:
                        return

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    assert opened.wait(30), "the stream of every job did not open"
    return thread


def _start(*processes: ServerProcess | WorkerProcess) -> None:
    with concurrent.futures.ThreadPoolExecutor(len(processes)) as pool:
        list(pool.map(lambda process: process.start(), processes))


def _load(replicas: list[ServerProcess], jobs: int) -> float:
    """``jobs`` small jobs submitted across the replicas, all done; the seconds they took."""
    start = time.monotonic()
    ids = [_submit(replicas[i % len(replicas)], seed=i) for i in range(jobs)]
    done = [_finished(replicas[(i + 1) % len(replicas)], job_id, 300) for i, job_id in enumerate(ids)]
    seconds = time.monotonic() - start
    assert [job["state"] for job in done] == ["done"] * jobs
    assert [job["attempts"] for job in done] == [1] * jobs  # each ran exactly once
    for i, job in enumerate(done):  # fetched from the replica that did not take it
        assert [image["n"] for image in job["images"]] == [0]
        assert _image_seed(replicas[(i + 1) % len(replicas)], job["images"][0]["url"]) == i
    return seconds


def _kill_mid_job(server: ServerProcess, workers: list[WorkerProcess]) -> float:
    """Kill -9 the worker of a job that has made some of its images; the job finishes elsewhere with
    each image once. The seconds from the kill to the job running again."""
    job_id = _submit(server, seed=1000, count=20, prior_steps=6)
    _until(lambda: len(_job(server, job_id)["images"]) >= 2, 120, "the job made images")
    victim = _until(lambda: _holder(server, job_id, workers), 30, "the job's worker is listed")
    victim.kill()
    killed = time.monotonic()
    workers.remove(victim)
    _until(lambda: _job(server, job_id)["attempts"] == 2, 60, "the job was re-leased")
    recovery = time.monotonic() - killed
    done = _finished(server, job_id)
    assert done["state"] == "done" and done["attempts"] == 2
    assert [(image["n"], image["seed"]) for image in done["images"]] == [(n, 1000 + n) for n in range(20)]
    return recovery


def _cancel_across(submitted: ServerProcess, other: ServerProcess) -> None:
    job_id = _submit(submitted, count=60)
    _until(lambda: _job(other, job_id)["state"] == "running", 120, "the long job started")
    assert httpx.delete(f"{other.url}/v1/jobs/{job_id}", timeout=30).status_code == 202
    cancelled = _finished(submitted, job_id, 30)
    assert cancelled["state"] == "cancelled" and len(cancelled["images"]) < 60


def _a1111_across(submitted: ServerProcess, other: ServerProcess) -> None:
    """AUTOMATIC1111's txt2img waits on one replica for a worker's images; its progress and interrupt
    reach a job submitted to the other replica."""
    body = {"prompt": PROMPT, "seed": 7, "steps": 2, "decoder_steps": 2, "width": 128, "height": 128}
    answer = httpx.post(f"{other.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert answer.status_code == 200 and len(answer.json()["images"]) == 1, answer.text
    job_id = _submit(submitted, count=60)

    def shown() -> dict[str, Any] | None:
        progress: dict[str, Any] = httpx.get(f"{other.url}/sdapi/v1/progress", timeout=30).json()
        return progress if progress["progress"] > 0 and progress["current_image"] else None

    progress = _until(shown, 120, "the other replica showed the job's progress")
    assert progress["state"]["job_count"] >= 1 and progress["state"]["sampling_steps"] > 0
    assert httpx.post(f"{other.url}/sdapi/v1/interrupt", timeout=30).json()["interrupted"] >= 1
    interrupted = _finished(submitted, job_id, 30)
    assert interrupted["state"] == "cancelled" and len(interrupted["images"]) < 60


def test_replicas_and_workers_on_postgresql(tmp_path: Path) -> None:
    with cluster() as postgresql:
        url = postgresql.database()
        replicas = [ServerProcess(tmp_path / f"replica{i}", "--store", url, "--no-workers") for i in (0, 1)]
        workers = [WorkerProcess(url, tmp_path / f"worker{i}", *LEASE) for i in (0, 1, 2)]
        try:
            _start(*replicas, *workers)
            a, b = replicas
            listed = httpx.get(f"{a.url}/v1/workers", timeout=30).json()["workers"]
            assert sorted(w["pid"] for w in listed) == sorted(w.process.pid for w in workers if w.process)
            assert {(w["kind"], w["device"], tuple(w["models"])) for w in listed} == {
                ("worker", "cpu", ("demo",))
            }

            seconds = _load(replicas, 60)
            print(f"60 jobs on 3 worker processes in {seconds:.1f} s")

            # priorities, behind three long jobs that hold the workers: a late urgent job goes first, a
            # late unimportant one last; then the long jobs are cancelled through the other replica
            blockers = [_submit(b, seed=900 + i, count=60) for i in range(3)]
            _until(lambda: all(_job(a, j)["state"] == "running" for j in blockers), 120, "all workers busy")
            queue = [_submit(a if i % 2 else b, seed=i) for i in range(6)]
            urgent = _submit(b, priority=10, seed=99)
            seen: list[tuple[str, str]] = []  # A's stream of every job, B's jobs too
            last: list[str] = []
            everyone = _stream_all(a, seen, last)
            last.append(_submit(b, priority=-1, prior_steps=5, count=2))
            kinds: list[str] = []
            reader = _stream(a, last[0], kinds)  # SSE from replica A of a job submitted to B
            for blocker in blockers:
                assert httpx.delete(f"{a.url}/v1/jobs/{blocker}", timeout=30).status_code == 202
            assert {_finished(b, blocker, 30)["state"] for blocker in blockers} == {"cancelled"}
            started = {job_id: _finished(a, job_id)["started"] for job_id in [*queue, urgent, *last]}
            assert started[urgent] < min(started[job_id] for job_id in queue)
            assert started[last[0]] >= max(started.values())
            reader.join(60)
            assert kinds[0] == "queued" and "started" in kinds and kinds[-1] == "done", kinds
            assert kinds.count("progress") == 2 * (5 + 2) and kinds.count("image") == 2 and "preview" in kinds
            everyone.join(60)
            of_last = [kind for job_id, kind in seen if job_id == last[0]]
            news = [kind for kind in kinds if kind not in ("queued", "preview")]  # queued: once, at first
            assert of_last == ["queued", *news], (of_last, kinds)
            assert {job_id for job_id, kind in seen if kind == "done"} >= {urgent, *queue}

            recovery = _kill_mid_job(b, workers)
            print(f"a worker killed mid-job: its job ran again {recovery:.1f} s later")
            spare = WorkerProcess(url, tmp_path / "worker3", *LEASE)
            workers.append(spare)  # started meanwhile, for the last part
            starting = threading.Thread(target=spare.start, daemon=True)
            starting.start()
            _a1111_across(b, a)

            # PostgreSQL restarted while jobs run: nothing is lost, everyone reconnects
            during = [_submit(b, seed=200 + 10 * i, prior_steps=4, count=4) for i in range(6)]
            _until(lambda: _job(b, during[0])["state"] != "queued", 60, "a job started")
            postgresql.restart()
            after = [_submit(a, seed=300 + i, timeout=60) for i in range(2)]
            assert {_finished(a, job_id, 180)["state"] for job_id in [*during, *after]} == {"done"}

            a.kill()  # clients of the other replica go on
            survivor = _finished(b, _submit(b, seed=400))
            assert _image_seed(b, survivor["images"][0]["url"]) == 400

            starting.join(240)
            assert spare.process is not None and spare.process.poll() is None
            _attempt_cap(b, workers)
        finally:
            for replica in replicas:
                replica.stop()
            for worker in workers:
                worker.kill_if_running()


def _attempt_cap(server: ServerProcess, workers: list[WorkerProcess]) -> None:
    """A job that kills every worker that runs it fails after the attempt cap, saying why."""
    job_id = _submit(server, count=60)
    for attempt in (1, 2, 3):
        victim = _until(lambda: _holder(server, job_id, workers), 120, f"run {attempt} started")
        victim.kill()
        workers.remove(victim)
    failed = _finished(server, job_id, 60)
    assert failed["state"] == "failed" and "given up" in failed["error"] and failed["attempts"] == 3


def _sigterm(server: ServerProcess, workers: list[WorkerProcess]) -> None:
    """SIGTERM twice queues the running job again (not counted as a run); once, it lets it finish."""
    job_id = _submit(server, seed=500, count=24, prior_steps=4)  # long enough to be seen running again
    first = _until(lambda: _holder(server, job_id, workers), 60, "the job started")
    assert first.process is not None
    first.process.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    first.process.send_signal(signal.SIGTERM)  # the second: no grace
    assert first.process.wait(60) == 0
    workers.remove(first)
    second = _until(lambda: _holder(server, job_id, workers), 60, "the job started again")
    assert second.stop() == 0  # lets the job finish first
    done = _job(server, job_id)
    assert done["state"] == "done" and done["attempts"] == 1 and len(done["images"]) == 24


def test_workers_in_separate_processes_on_a_data_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    replica = ServerProcess(data, "--no-workers")
    workers = [WorkerProcess(str(data), data, *LEASE, "--grace", "120") for _ in (0, 1, 2)]
    try:
        _start(replica, *workers)
        seconds = _load([replica], 16)
        print(f"16 jobs on 3 worker processes (SQLite) in {seconds:.1f} s")
        recovery = _kill_mid_job(replica, workers)
        print(f"a worker killed mid-job: its job ran again {recovery:.1f} s later")
        kinds: list[str] = []
        blocker = _submit(replica, count=4)
        job_id = _submit(replica, seed=5, prior_steps=3, count=2)
        reader = _stream(replica, job_id, kinds)
        assert _finished(replica, blocker)["state"] == _finished(replica, job_id)["state"] == "done"
        reader.join(60)
        assert kinds.count("progress") == 2 * (3 + 2) and kinds[-1] == "done", kinds
        _cancel_across(replica, replica)
        _sigterm(replica, workers)
    finally:
        replica.stop()
        for worker in workers:
            worker.kill_if_running()
