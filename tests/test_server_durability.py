"""The queue loses nothing: a server killed with SIGKILL in the middle of a job and started again on the
same data folder finishes every queued and running job, in order, and still serves every finished image."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from serving import PROMPT, ServerProcess, wait_for_job

pytestmark = pytest.mark.slow


def _submit(server: ServerProcess, **fields: object) -> str:
    answer = httpx.post(f"{server.url}/v1/jobs", json={"prompt": PROMPT, **fields}, timeout=30)
    assert answer.status_code == 201, answer.text
    return str(answer.json()["id"])


def _get(server: ServerProcess, path: str) -> httpx.Response:
    answer = httpx.get(server.url + path, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer


def test_kill_9_mid_job_then_restart_finishes_everything(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = ServerProcess(data).start()
    try:
        finished = wait_for_job(server, _submit(server, seed=1, count=2))
        before = {image["n"]: _get(server, image["url"]).content for image in finished["images"]}
        running = _submit(server, seed=10, count=8, prior_steps=8, decoder_steps=4)
        queued = [_submit(server, seed=100 + 10 * i, count=2, prior_steps=8) for i in range(3)]
        deadline = time.monotonic() + 120
        while len(_get(server, f"/v1/jobs/{running}").json()["images"]) < 2:  # mid-job: some images made
            assert time.monotonic() < deadline, "the job made no images"
            time.sleep(0.05)
        early = _get(server, f"/v1/jobs/{running}/images/0").content
    finally:
        server.kill()
    assert _get_state_offline(data, running) == "running"

    with ServerProcess(data) as restarted:
        again = wait_for_job(restarted, running, timeout=300)
        assert again["state"] == "done" and [i["seed"] for i in again["images"]] == list(range(10, 18))
        assert _get(restarted, f"/v1/jobs/{running}/images/0").content == early  # the same job, redone
        jobs = [wait_for_job(restarted, job_id, timeout=300) for job_id in queued]
        assert [job["state"] for job in jobs] == ["done"] * 3
        assert all(len(job["images"]) == 2 for job in jobs)
        order = [again["finished"], *(job["finished"] for job in jobs)]
        assert order == sorted(order)  # first in, first out, the interrupted job first
        for image in finished["images"]:
            assert _get(restarted, image["url"]).content == before[image["n"]]
    assert not list(data.glob("images/*/.*")), "temporary files are cleaned up"


def _get_state_offline(data: Path, job_id: str) -> str:
    """The job's state as the killed server left it on disk."""
    import sqlite3

    with sqlite3.connect(data / "jobs.sqlite3") as db:
        (state,) = db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
    return str(state)
