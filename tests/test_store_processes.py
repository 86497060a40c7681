"""The job store's claims between real processes, on both backends (a data folder shared by processes
on one host, and a real PostgreSQL server): racing workers never claim one job twice and each takes the
jobs in priority order; a job whose worker is killed (``kill -9``) at every run fails after the attempt
cap, saying why. The workers here are processes forked from the test that only claim (no model), so
each wait is short; every wait is bounded."""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import pytest
from postgres import Cluster, cluster

from stable_cascade.server.store import DONE, FAILED, MAX_ATTEMPTS, QUEUED, RUNNING, Store

WAIT_SECONDS = 60.0
Where = tuple[Path, str | None]  # the data folder, the PostgreSQL URL (None: the store is the folder)


def _claimer(where: Where, hold: bool, orders: Connection) -> None:
    """A worker process: once told to go, claims jobs until none waits (sending each's id and priority,
    then None) and marks them done; ``hold``: claims one job and waits to be killed."""
    orders.recv()
    store = Store(where[0], 1000, url=where[1])
    worker = store.register("worker", "cpu", [])
    while (job := store.claim(worker)) is not None:
        orders.send((job.id, job.priority))
        if hold:
            time.sleep(WAIT_SECONDS * 10)
        store.finish(job.id, DONE, worker=worker)
    orders.send(None)
    store.close()


def _start(where: Where, hold: bool, count: int) -> list[tuple[BaseProcess, Connection]]:
    """``count`` worker processes, forked before this process opens a store (they start at once: no
    imports), waiting to be told to go."""
    started = []
    for _ in range(count):
        ours, theirs = multiprocessing.Pipe()
        process = multiprocessing.get_context("fork").Process(target=_claimer, args=(where, hold, theirs))
        process.start()
        started.append((process, ours))
    return started


def _received(connection: Connection) -> tuple[str, int] | None:
    assert connection.poll(WAIT_SECONDS), "a worker process said nothing"
    message: tuple[str, int] | None = connection.recv()
    return message


@pytest.fixture(scope="module")
def postgresql() -> Iterator[Cluster]:
    with cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request: pytest.FixtureRequest, tmp_path: Path) -> Where:
    url = request.getfixturevalue("postgresql").database() if request.param == "postgresql" else None
    return tmp_path / "data", url


def test_racing_worker_processes_claim_each_job_once_in_priority_order(where: Where) -> None:
    workers = _start(where, False, 3)
    store = Store(where[0], 1000, url=where[1])
    try:
        priorities = {store.add({"n": i}, priority=i % 3).id: i % 3 for i in range(90)}
        for _, connection in workers:  # all at once
            connection.send("go")
        claims: list[list[tuple[str, int]]] = []
        for process, connection in workers:
            claimed = []
            while (claim := _received(connection)) is not None:
                claimed.append(claim)
            claims.append(claimed)
            process.join(WAIT_SECONDS)
            assert process.exitcode == 0
        assert sorted(job_id for claimed in claims for job_id, _ in claimed) == sorted(priorities)  # once
        for claimed in claims:  # each claim took the highest priority left: each worker's go down
            order = [priority for _, priority in claimed]
            assert order == sorted(order, reverse=True), order
        assert store.count(DONE) == 90 and store.count(QUEUED, RUNNING) == 0
    finally:
        store.close()
        for process, _ in workers:
            process.kill()


def test_a_job_that_kills_each_worker_fails_after_the_attempt_cap(where: Where) -> None:
    workers = _start(where, True, MAX_ATTEMPTS)
    store = Store(where[0], 1000, url=where[1])
    try:
        job_id = store.add({"n": 1}).id
        for attempt, (process, connection) in enumerate(workers, start=1):
            connection.send("go")
            claim = _received(connection)
            assert claim is not None and claim[0] == job_id
            process.kill()  # SIGKILL
            process.join(WAIT_SECONDS)
            assert store.get(job_id).attempts == attempt  # type: ignore[union-attr]
            last = attempt == MAX_ATTEMPTS
            assert store.reap() == (0 if last else 1)  # its process is gone: at once
        failed = store.get(job_id)
        assert failed is not None and failed.state == FAILED and failed.attempts == MAX_ATTEMPTS
        assert "given up" in str(failed.error)
    finally:
        store.close()
        for process, _ in workers:
            process.kill()
