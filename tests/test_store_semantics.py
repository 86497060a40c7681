"""The job store's semantics, the same on both backends (each test runs on SQLite and on a real
PostgreSQL server): priorities and order, leases and their renewal, the reaper, the attempt cap,
fenced results, images kept once, cancel requests, live news, the workers, uploads and the schema's
versions. Several stores on one database stand for several processes (each has its own connections)."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postgres import Cluster, cluster

from stable_cascade.server import schema
from stable_cascade.server.board import Orders
from stable_cascade.server.hub import ALL
from stable_cascade.server.store import (
    CANCELLED,
    DONE,
    FAILED,
    MAX_ATTEMPTS,
    QUEUED,
    RUNNING,
    QueueFull,
    Store,
    StoreError,
)

Open = Callable[..., Store]


@pytest.fixture(scope="module")
def postgresql() -> Iterator[Cluster]:
    with cluster() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Open]:
    """``open_store(folder="a", max_queue=100)``: a store on this test's database (a new one each test);
    stores opened with other folders stand for other hosts (PostgreSQL) or processes (SQLite)."""
    url = request.getfixturevalue("postgresql").database() if request.param == "postgresql" else None
    opened: list[Store] = []

    def open_store(folder: str = "a", max_queue: int = 100) -> Store:
        place = tmp_path / "data" if url is None else tmp_path / folder
        opened.append(Store(place, max_queue, url=url))
        return opened[-1]

    yield open_store
    for store in opened:
        store.close()


def test_priorities_order_the_queue_oldest_first_within_one(open_store: Open) -> None:
    store = open_store(max_queue=5)
    ids = [store.add({"n": i}, priority=p).id for i, p in enumerate([0, 5, 0, 5, -1])]
    with pytest.raises(QueueFull, match="the queue is full"):
        store.add({"n": 5})
    positions = [store.position(store.get(job_id)) for job_id in ids]  # type: ignore[arg-type]
    assert positions == [2, 0, 3, 1, 4]
    claimed = [store.claim() for _ in ids]
    assert [job.id for job in claimed if job] == [ids[1], ids[3], ids[0], ids[2], ids[4]]
    assert store.claim() is None and {job.state for job in claimed if job} == {RUNNING}


def test_racing_workers_never_claim_one_job_twice(open_store: Open) -> None:
    stores = [open_store(f"host{i}", max_queue=1000) for i in range(4)]
    ids = {stores[0].add({"n": i}).id for i in range(120)}
    claims: list[list[str]] = [[] for _ in stores]

    def drain(i: int) -> None:
        worker = stores[i].register("worker", "cpu", [])
        while (job := stores[i].claim(worker)) is not None:
            claims[i].append(job.id)
            assert stores[i].finish(job.id, DONE, worker=worker)

    threads = [threading.Thread(target=drain, args=(i,)) for i in range(len(stores))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    everything = [job_id for claimed in claims for job_id in claimed]
    assert sorted(everything) == sorted(ids)  # each once
    assert stores[0].count(DONE) == 120


def test_an_expired_lease_returns_the_job_in_its_place_and_the_cap_fails_it(open_store: Open) -> None:
    store, other = open_store("a"), open_store("b")
    first, second = store.add({"n": 1}).id, store.add({"n": 2}).id
    for attempt in range(1, MAX_ATTEMPTS + 1):
        worker = store.register("worker", "cpu", [])
        job = store.claim(worker, lease=0.3)
        assert job is not None and job.id == first and job.attempts == attempt
        assert other.reap() == 0  # the lease holds
        time.sleep(0.4)
        last = attempt == MAX_ATTEMPTS
        assert other.reap() == (0 if last else 1)  # it ran out: queued again, ahead of the second job
        assert not store.finish(first, DONE, worker=worker)  # the late worker is refused
        assert store.get(first).state == (FAILED if last else QUEUED)  # type: ignore[union-attr]
    job = other.claim()
    assert job is not None and job.id == second
    given_up = store.get(first)
    assert given_up is not None and given_up.state == FAILED and "given up" in str(given_up.error)
    assert f"each of this job's {MAX_ATTEMPTS} runs" in str(given_up.error)


def test_heartbeats_renew_the_lease_and_carry_cancel_requests(open_store: Open) -> None:
    store, replica = open_store("worker-host"), open_store("api-host")
    job_id = replica.add({"n": 1}).id
    worker = store.register("worker", "cuda:1", ["demo"])
    assert store.claim(worker, lease=0.5) is not None
    for _ in range(4):
        time.sleep(0.25)
        assert store.heartbeat({worker: job_id}, 0.5) == {job_id: False}
        assert replica.reap() == 0
    listed = replica.workers()
    assert [(w.id, w.device, w.models, w.job) for w in listed] == [(worker, "cuda:1", ["demo"], job_id)]
    assert listed[0].heartbeat_age < 0.5
    assert replica.cancel_running(job_id) == 1 and not replica.cancel_queued(job_id)
    assert store.heartbeat({worker: job_id}, 0.5) == {job_id: True}
    assert store.post(job_id, {"type": "progress", "fraction": 0.5}, worker).stop  # stop, it says
    assert store.finish(job_id, CANCELLED, worker=worker)
    assert store.heartbeat({worker: job_id}, 0.5) == {}  # no longer held
    store.worker_stopped(worker)
    assert replica.workers() == []


def test_a_cancelled_job_whose_worker_died_ends_cancelled(open_store: Open) -> None:
    store = open_store()
    job_id = store.add({}).id
    store.claim(store.register("worker", "cpu", []), lease=0.2)
    store.cancel_running()
    time.sleep(0.3)
    assert store.reap() == 0 and store.get(job_id).state == CANCELLED  # type: ignore[union-attr]


def test_a_released_job_runs_again_uncounted_and_a_cancelled_one_ends(open_store: Open) -> None:
    store = open_store()
    kept, cancelled = store.add({"n": 1}).id, store.add({"n": 2}).id
    worker = store.register("worker", "cpu", [])
    assert store.claim(worker).id == kept  # type: ignore[union-attr]
    store.release(kept, worker)  # SIGTERM: the worker stops cleanly
    again = store.claim(worker)
    assert again is not None and again.id == kept and again.attempts == 1
    store.finish(kept, DONE, worker=worker)
    assert store.claim(worker).id == cancelled  # type: ignore[union-attr]
    store.cancel_running(cancelled)
    store.release(cancelled, worker)
    assert store.get(cancelled).state == CANCELLED and store.claim(worker) is None  # type: ignore[union-attr]


def test_images_are_kept_once_per_job_and_index_and_any_store_serves_them(open_store: Open) -> None:
    store, replica = open_store("worker-host"), open_store("api-host")
    job_id = replica.add({}).id
    store.claim()
    store.write_image(job_id, 0, 7, "first run", b"first")
    store.write_image(job_id, 1, 8, "first run", b"second")
    store.write_image(job_id, 0, 7, "second run", b"again")  # a job that ran twice
    assert [(i.n, i.seed, i.infotext) for i in replica.images(job_id)] == [
        (0, 7, "first run"),
        (1, 8, "first run"),
    ]
    assert replica.png(job_id, 0) == b"first" and replica.png(job_id, 2) is None
    news = replica.events_after({job_id: 0})
    assert [message["type"] for _, _, message in news] == ["queued", "started", "image", "image"]


def test_live_news_reaches_another_store_after_its_cursor(open_store: Open) -> None:
    store, replica = open_store("worker-host"), open_store("api-host")
    job_id, other = replica.add({}).id, replica.add({}).id
    worker = store.register("worker", "cpu", [])
    store.claim(worker)
    cursor = replica.last_event(job_id)
    progress = {"type": "progress", "stage": "prior", "step": 1, "steps": 4, "fraction": 0.25}
    assert not store.post(job_id, progress, worker).stop
    preview = {"type": "preview", "index": 0, "step": 1, "image": "iVBORw=="}
    assert not store.post(job_id, preview, worker).stop
    assert store.post(other, progress, worker).stop  # not its job
    news = replica.events_after({job_id: cursor, other: replica.last_event(other)})
    assert [(job, message["type"]) for job, _, message in news] == [(job_id, "progress"), (job_id, "preview")]
    live = replica.live(job_id)
    assert live is not None and (live.fraction, live.step, live.steps, live.stage) == (0.25, 1, 4, "prior")
    assert live.preview == b"\x89PNG"
    current = replica.current()
    assert current is not None and current[0] == job_id
    assert replica.live(other) is None


def test_skip_reaches_the_worker_once_and_deleting_is_news_for_everyone(open_store: Open) -> None:
    store, replica = open_store("worker-host"), open_store("api-host")
    job_id, waiting = replica.add({}).id, replica.add({}).id
    start = replica.last_event(ALL)
    worker = store.register("worker", "cpu", [])
    store.claim(worker)
    assert replica.skip_running() == 1 and replica.live(job_id).skipping  # type: ignore[union-attr]
    progress = {"type": "progress", "fraction": 0.5}
    assert store.post(job_id, progress, worker) == Orders(skip=True)
    assert store.post(job_id, progress, worker) == Orders()  # asked once, told once
    assert not replica.delete(job_id) and not replica.delete(waiting)  # running, queued: not deleted
    store.write_image(job_id, 0, 1, "", b"png")
    store.finish(job_id, DONE, worker=worker)
    assert replica.delete(job_id) and replica.get(job_id) is None and replica.images(job_id) == []
    news = replica.everyones_events(start, start)
    kinds = [(job, message["type"]) for job, _, message in news]
    expected = ("started", "progress", "progress", "image", "done", "deleted")
    assert kinds == [(job_id, kind) for kind in expected]
    assert replica.everyones_events(start, news[-1][1]) == news  # the latest seconds are looked at again
    assert replica.everyones_events(news[-1][1], news[-1][1]) == []


def test_a_worker_whose_process_died_on_this_host_loses_its_job_at_once(open_store: Open) -> None:
    store = open_store()
    job_id = store.add({}).id
    worker = store.register("worker", "cpu", [])
    store.claim(worker, lease=600)
    gone = subprocess.Popen(["true"])
    gone.wait()
    with store.db.transaction() as tx:  # as if that process had registered the worker
        tx.run("UPDATE workers SET pid = ? WHERE id = ?", (gone.pid, worker))
    assert store.reap() == 1 and store.get(job_id).state == QUEUED  # type: ignore[union-attr]
    assert store.workers() == []


def test_uploads_reach_a_worker_on_another_host(open_store: Open) -> None:
    replica = open_store("api-host")
    (replica.inputs_dir / "abc.png").write_bytes(b"an upload")
    job_id = replica.add({}, "abc.png").id
    worker = open_store("worker-host")
    assert worker.get(job_id).input == "abc.png"  # type: ignore[union-attr]
    assert worker.input_file("abc.png").read_bytes() == b"an upload"
    with pytest.raises(FileNotFoundError, match=r"the upload missing\.png is in no store"):
        worker.input_file("missing.png")


def test_settings_are_shared(open_store: Open) -> None:
    first, second = open_store("a"), open_store("b")
    first.set_setting("sd_model_checkpoint", "demo")
    first.set_setting("sd_model_checkpoint", "lite")
    assert second.setting("sd_model_checkpoint") == "lite" and second.setting("missing") is None


def test_a_newer_schema_is_refused(open_store: Open) -> None:
    store = open_store("a")
    with store.db.transaction() as tx:
        tx.run("UPDATE schema_version SET version = ?", (schema.VERSION + 1,))
    with pytest.raises(ValueError, match=rf"has schema version {schema.VERSION + 1}, newer than") as refused:
        open_store("b")
    assert "\n" not in str(refused.value) and "upgrade stable-cascade" in str(refused.value)


def test_stores_started_together_migrate_once(open_store: Open) -> None:
    opened: list[Store] = []
    threads = [threading.Thread(target=lambda i=i: opened.append(open_store(f"h{i}"))) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(opened) == 4
    with opened[0].db.read() as tx:
        assert tx.rows("SELECT version FROM schema_version") == [{"version": schema.VERSION}]


@pytest.mark.slow
def test_a_restarted_postgresql_is_reconnected(postgresql: Cluster, tmp_path: Path) -> None:
    store = Store(tmp_path, 100, url=postgresql.database())
    try:
        job_id = store.add({"n": 1}).id
        postgresql.stop()
        with pytest.raises(StoreError):
            store.get(job_id)
        postgresql.start()
        deadline = time.monotonic() + 30
        while True:
            try:
                assert store.get(job_id).state == QUEUED  # type: ignore[union-attr]
                break
            except StoreError:
                assert time.monotonic() < deadline, "the store did not reconnect"
                time.sleep(0.2)
        assert store.claim() is not None
    finally:
        store.close()


def test_a_database_of_the_single_server_is_brought_up_to_date(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "data"
    (data / "images" / "old").mkdir(parents=True)
    (data / "images" / "old" / "0.png").write_bytes(b"an old image")
    with sqlite3.connect(data / "jobs.sqlite3") as db:  # as a server before schema versions left it
        for statement in schema.MIGRATIONS["sqlite"][1]:
            db.execute(statement)
        for job_id, state in (("old", DONE), ("cut", RUNNING), ("next", QUEUED)):
            db.execute(
                "INSERT INTO jobs (id, state, job, created, attempts) VALUES (?, ?, '{}', 1.0, 1)",
                (job_id, state),
            )
        db.execute("INSERT INTO images VALUES ('old', 0, 5, 'images/old/0.png', 'Steps: 20')")
    store = Store(data, 10)
    try:
        assert store.png("old", 0) == b"an old image" and store.images("old")[0].seed == 5
        assert store.recover() == 1  # the job the old server was running
        assert [store.claim().id, store.claim().id] == ["cut", "next"]  # type: ignore[union-attr]
        with store.db.read() as tx:
            assert tx.rows("SELECT version FROM schema_version") == [{"version": schema.VERSION}]
    finally:
        store.close()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["worker", "--store", "postgresql://nobody@127.0.0.1:9/none"], "cannot connect to the job store"),
        (["worker", "--lease", "0.1", "--store", "{data}"], "--lease must be at least 1 seconds"),
        (["serve", "--no-workers", "--store", "mysql://x/y", "--data", "{data}"], "--store must be"),
    ],
)
def test_worker_and_serve_refuse_with_one_line(
    command: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from stable_cascade.cli.main import main

    code = main([part.replace("{data}", str(tmp_path / "data")) for part in command] + ["--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err and expected in err, err
