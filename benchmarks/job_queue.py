"""The job store's cost and the demo's throughput across worker processes (issue 28).

    python benchmarks/job_queue.py overhead --jobs 200 --events 20
    python benchmarks/job_queue.py throughput --jobs 30 --workers 1 2 3

``overhead``: per job, what the queue adds around the work — claim, ``--events`` progress posts and
the result (one PNG of ``--png-kib`` recorded, then the end) — on SQLite (a data folder, synchronous
commits) and on PostgreSQL (a throwaway local server with fsync on, over TCP on 127.0.0.1); medians.
``throughput``: jobs/s of the demo model with ``--jobs`` jobs submitted at once, for the plain server
(SQLite, one worker thread in the server) and for one API replica with 1, 2, 3 ``stable-cascade
worker`` processes on PostgreSQL; processes are started and warm before the clock starts.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# This checkout and the tests' process helpers; not this folder (a script here named like a standard
# module, as this one was, would shadow it).
sys.path[:] = [
    str(ROOT),
    str(ROOT / "tests"),
    *(p for p in sys.path if Path(p or ".").resolve() != ROOT / "benchmarks"),
]
import httpx  # noqa: E402
from postgres import cluster  # noqa: E402
from serving import PROMPT, ServerProcess, WorkerProcess  # noqa: E402

from stable_cascade.server.store import DONE, Store  # noqa: E402


def overhead(args: argparse.Namespace) -> None:
    png = os.urandom(args.png_kib * 1024)
    progress = {"type": "progress", "stage": "prior", "step": 1, "steps": 20, "fraction": 0.5}
    print("| store | claim ms | progress post ms | result ms (image + end) | queue ms per job |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder, cluster(fsync=True) as server:
        for name, url in (("sqlite", None), ("postgresql", server.database())):
            store = Store(Path(folder) / name, 10**6, url=url)
            for i in range(args.jobs):
                store.add({"n": i})
            worker = store.register("worker", "cpu", [])
            claims, posts, results = [], [], []
            for _ in range(args.jobs):
                start = time.perf_counter()
                job = store.claim(worker)
                claims.append(time.perf_counter() - start)
                assert job is not None
                start = time.perf_counter()
                for _ in range(args.events):
                    store.post(job.id, progress, worker)
                posts.append((time.perf_counter() - start) / args.events)
                start = time.perf_counter()
                store.write_image(job.id, 0, 0, "Steps: 20", png)
                store.finish(job.id, DONE, None, worker)
                results.append(time.perf_counter() - start)
            store.close()
            claim, post, result = (1000 * statistics.median(values) for values in (claims, posts, results))
            total = claim + args.events * post + result
            print(f"| {name} | {claim:.2f} | {post:.2f} | {result:.2f} | {total:.1f} |")


def _run_jobs(replica: ServerProcess, jobs: int) -> float:
    """Seconds from submitting ``jobs`` demo jobs at once to the last one done."""
    start = time.monotonic()
    ids = []
    for i in range(jobs):
        body = {"prompt": PROMPT, "seed": i}
        ids.append(httpx.post(f"{replica.url}/v1/jobs", json=body, timeout=60).json()["id"])
    for job_id in ids:
        while httpx.get(f"{replica.url}/v1/jobs/{job_id}", timeout=60).json()["state"] != DONE:
            time.sleep(0.05)
    return time.monotonic() - start


def throughput(args: argparse.Namespace) -> None:
    print(f"| setup | {args.jobs} jobs s | jobs/s |")
    print("|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        with ServerProcess(Path(folder) / "plain", "--max-queue", "1000") as plain:
            _run_jobs(plain, 2)  # warm
            seconds = _run_jobs(plain, args.jobs)
        print(f"| plain serve, 1 worker thread (SQLite) | {seconds:.1f} | {args.jobs / seconds:.2f} |")
        with cluster(fsync=True) as server:
            for count in args.workers:
                url = server.database()
                replica = ServerProcess(Path(folder) / f"replica{count}", "--store", url, "--no-workers")
                workers = [WorkerProcess(url, Path(folder) / f"w{count}-{i}") for i in range(count)]
                try:
                    for process in [replica, *workers]:
                        process.start()
                    _run_jobs(replica, count)  # warm
                    seconds = _run_jobs(replica, args.jobs)
                finally:
                    replica.stop()
                    for worker in workers:
                        worker.stop()
                label = f"API replica + {count} worker process{'es' * (count > 1)} (PostgreSQL)"
                print(f"| {label} | {seconds:.1f} | {args.jobs / seconds:.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    measure = commands.add_parser("overhead")
    measure.add_argument("--jobs", type=int, default=200)
    measure.add_argument("--events", type=int, default=20, help="progress posts per job")
    measure.add_argument("--png-kib", type=int, default=64, help="size of each job's image")
    measure.set_defaults(run=overhead)
    measure = commands.add_parser("throughput")
    measure.add_argument("--jobs", type=int, default=30)
    measure.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    measure.set_defaults(run=throughput)
    args = parser.parse_args()
    machine = platform.processor() or platform.machine()
    print(f"{machine}, {os.cpu_count()} cores, Python {platform.python_version()}")
    args.run(args)


if __name__ == "__main__":
    main()
