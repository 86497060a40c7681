"""Load: 50 concurrent A1111 requests against the demo model on 127.0.0.1, mixed with bad requests. Every
good request gets its image, nothing is lost, the server's memory stays flat, and no bad request (each
answered with a 4xx and a message) stops the worker."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from serving import PROMPT, ServerProcess

pytestmark = pytest.mark.slow
KEY = "load-test-key"
REQUESTS = 50
RSS_GROWTH_LIMIT = 200 * 1024 * 1024  # bytes, after the models are loaded


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _good(server: ServerProcess, i: int) -> httpx.Response:
    body = {"prompt": PROMPT, "seed": i, "width": 128, "height": 128, "steps": 6, "decoder_steps": 3}
    return httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, headers=server.headers, timeout=600)


def _bad_requests(server: ServerProcess) -> list[tuple[Callable[[], httpx.Response], int, str]]:
    url, headers = f"{server.url}/sdapi/v1/txt2img", server.headers
    json_headers = {**headers, "Content-Type": "application/json"}
    return [
        (lambda: httpx.post(url, content=b'{"prompt": ', headers=json_headers), 400, "not valid JSON"),
        (lambda: httpx.post(url, json={"width": 100_000, "height": 100_000}, headers=headers), 422, "width"),
        (lambda: httpx.post(url, json={"steps": "twenty"}, headers=headers), 422, "whole number"),
        (lambda: httpx.post(url, json={"batch_size": [1]}, headers=headers), 422, "batch size"),
        (
            lambda: httpx.post(url, content=b"x" * (17 * 1024 * 1024), headers=json_headers),
            413,
            "larger than",
        ),
        (
            lambda: httpx.post(url, json={"prompt": PROMPT}, headers={"Authorization": "Bearer no"}),
            401,
            "API key",
        ),
    ]


def test_fifty_concurrent_requests_and_bad_ones(tmp_path: Path) -> None:
    with ServerProcess(tmp_path / "data", api_key=KEY) as server:
        assert server.process is not None
        assert _good(server, 0).status_code == 200  # warm: models loaded
        before = _rss(server.process.pid)
        bad = _bad_requests(server) * 2
        start = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(max_workers=REQUESTS + len(bad)) as pool:
            good = [pool.submit(_good, server, i) for i in range(1, REQUESTS + 1)]
            refused = [(pool.submit(call), status, text) for call, status, text in bad]
            answers = [future.result() for future in good]
        seconds = time.monotonic() - start
        for future, status, text in refused:
            answer = future.result()
            assert answer.status_code == status and text in answer.json()["detail"], answer.text
        assert [answer.status_code for answer in answers] == [200] * REQUESTS
        infos = [json.loads(answer.json()["info"]) for answer in answers]
        assert sorted(info["seed"] for info in infos) == list(range(1, REQUESTS + 1))
        assert all(len(answer.json()["images"]) == 1 for answer in answers)
        assert len({info["job_id"] for info in infos}) == REQUESTS
        jobs = httpx.get(f"{server.url}/v1/jobs?limit=200", headers=server.headers).json()["jobs"]
        assert len(jobs) == REQUESTS + 1 and {job["state"] for job in jobs} == {"done"}
        assert _good(server, 99).status_code == 200  # the worker still runs
        growth = _rss(server.process.pid) - before
        print(f"{REQUESTS} requests in {seconds:.1f} s; server RSS grew {growth / 2**20:.1f} MiB")
        assert growth < RSS_GROWTH_LIMIT, f"the server's memory grew {growth / 2**20:.0f} MiB"
