"""What ``serve`` refuses before it binds a port, each with one line and exit code 2: a data folder
another server is using, a job database that is not one, a device that is not there, and settings out
of range. A server killed with SIGKILL leaves nothing that blocks the next start."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from serving import PROMPT, ROOT, ServerProcess, free_port, wait_for_job

from stable_cascade.cli.main import main
from stable_cascade.server.lock import DataLock, FolderInUse
from stable_cascade.server.store import Store


@pytest.fixture
def no_serving(monkeypatch: pytest.MonkeyPatch) -> None:
    """A ``serve`` that gets as far as starting the HTTP server fails the test instead of serving."""
    import uvicorn

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("serve would have started; it should have refused")

    monkeypatch.setattr(uvicorn, "run", refuse)


def _refusal(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """The one line ``serve ARGV`` refuses with (exit code 2, from ``main`` or the argument parser)."""
    try:
        code = main(["serve", "--model", "demo", *argv])
    except SystemExit as exit_info:
        code = int(exit_info.code or 0)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "70000", "between 1 and 65535"),
        ("--port", "-1", "between 1 and 65535"),
        ("--port", "0", "between 1 and 65535"),
        ("--port", "http", "expected a port number"),
        ("--max-body-mb", "inf", "finite size"),
        ("--max-body-mb", "-1", "above 0"),
        ("--max-body-mb", "nan", "finite size"),
        ("--max-body-mb", "0", "above 0"),
        ("--max-images-per-job", "0", "--max-images-per-job must be at least 1"),
    ],
)
def test_settings_out_of_range_are_refused(
    option: str,
    value: str,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    no_serving: None,
) -> None:
    error = _refusal(capsys, "--data", str(tmp_path), "--device", "cpu", f"{option}={value}")
    assert message in error


@pytest.mark.parametrize("device", ["bogus", "cuda", "cuda:7"])
def test_a_device_that_is_not_there_is_refused_before_the_data_folder_is_touched(
    device: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], no_serving: None
) -> None:
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has the device")
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    error = _refusal(capsys, "--data", str(tmp_path / "data"), "--device", device)
    assert f"device {device!r}" in error
    assert not (tmp_path / "data").exists()


def test_a_corrupt_or_truncated_job_database_stops_serve_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_serving: None
) -> None:
    store = Store(tmp_path / "kept", max_queue=1000)
    for i in range(200):
        store.add({"prompt": "a job worth keeping " * 20, "n": i})
    store.close()
    database = (tmp_path / "kept" / "jobs.sqlite3").read_bytes()
    for name, content in (("garbage", os.urandom(20_000)), ("truncated", database[: len(database) // 2])):
        data = tmp_path / name
        data.mkdir()
        (data / "jobs.sqlite3").write_bytes(content)
        error = _refusal(capsys, "--data", str(data), "--device", "cpu")
        assert "is not a readable job database" in error and "move it" in error, error
        assert (data / "jobs.sqlite3").read_bytes() == content  # left as it was, for the user to rescue


def test_the_data_folder_lock_is_exclusive_and_released(tmp_path: Path) -> None:
    first = DataLock(tmp_path, "127.0.0.1", 7860)
    with pytest.raises(
        FolderInUse, match=rf"another server \(pid {os.getpid()}, http://127\.0\.0\.1:7860/\)"
    ):
        DataLock(tmp_path, "::1", 7861)
    first.release()
    DataLock(tmp_path, "127.0.0.1", 7861).release()


def _serve(data: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """``serve`` on ``data`` and a free port, as a separate process (expected to refuse)."""
    command = [sys.executable, "-m", "stable_cascade", "serve", "--model", "demo", "--device", "cpu"]
    command += ["--data", str(data), "--port", str(free_port())]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_second_server_on_one_data_folder_refuses_and_a_killed_one_blocks_nothing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first = ServerProcess(data).start()
    try:
        assert first.process is not None
        answer = httpx.post(f"{first.url}/v1/jobs", json={"prompt": PROMPT, "count": 40}, timeout=30)
        running = answer.json()["id"]
        deadline = time.monotonic() + 60
        while httpx.get(f"{first.url}/v1/jobs/{running}", timeout=30).json()["state"] != "running":
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.05)
        second = _serve(data)
        assert second.returncode == 2, second.stderr
        line = second.stderr.strip()
        assert "\n" not in line and "another server" in line, line
        assert f"pid {first.process.pid}, http://127.0.0.1:{first.port}/" in line
        with sqlite3.connect(data / "jobs.sqlite3") as db:  # the first server's job was left alone
            (state, attempts) = db.execute(
                "SELECT state, attempts FROM jobs WHERE id = ?", (running,)
            ).fetchone()
        assert (state, attempts) == ("running", 1)
        assert httpx.get(f"{first.url}/v1/jobs/{running}", timeout=30).json()["state"] == "running"
    finally:
        first.kill()
    with ServerProcess(data) as restarted:  # SIGKILL freed the lock with the process
        httpx.delete(f"{restarted.url}/v1/jobs/{running}", timeout=30)
        done = wait_for_job(restarted, running)
        assert done["state"] == "cancelled"
