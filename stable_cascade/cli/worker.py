"""``worker``: pull jobs from a shared job store and run them (one process per GPU)."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from stable_cascade.fields import BY_NAME, DTYPES

MODEL = BY_NAME["model"]


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    description = (
        "pull jobs from a job store (a PostgreSQL database, or a data folder on this host) and run them; "
        "start one per GPU, on any hosts, beside 'serve --store URL --no-workers' replicas. SIGTERM lets "
        "the running job finish within --grace, else queues it again for another worker"
    )
    parser = commands.add_parser(
        "worker", parents=[common], help="run jobs from a shared job store", description=description
    )
    parser.add_argument(
        "--store",
        help="postgresql://user@host/db, or the data folder of a server on this host "
        "(~/.local/share/stable-cascade)",
    )
    parser.add_argument(
        "--data", type=Path, help="this host's folder for uploads fetched from a PostgreSQL store"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA with bf16, else fp32"
    )
    parser.add_argument(
        "--model",
        action="append",
        choices=MODEL.choices,
        default=[],
        help="load this model before taking jobs (repeat for several)",
    )
    parser.add_argument(
        "--lease", type=float, default=15.0, help="seconds a job stays held without a heartbeat (15)"
    )
    parser.add_argument(
        "--grace", type=float, default=20.0, help="seconds SIGTERM lets the running job finish (20)"
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from stable_cascade.server import WorkerConfig, WorkerProcess, locate_store

    data, url = locate_store(args.store, args.data)
    config = WorkerConfig(
        store=url or str(data),
        data=data,
        device=args.device,
        dtype=args.dtype,
        models=tuple(args.model),
        lease=args.lease,
        grace=args.grace,
    )
    if logging.getLogger("stable_cascade").getEffectiveLevel() > logging.INFO:
        logging.getLogger("stable_cascade").setLevel(logging.INFO)
    worker = WorkerProcess(config)
    stop, hurry = threading.Event(), threading.Event()

    def on_signal(number: int, frame: FrameType | None) -> None:
        (hurry if stop.is_set() else stop).set()  # a second signal: stop without the grace period

    for number in (signal.SIGTERM, signal.SIGINT):
        signal.signal(number, on_signal)
    worker.start()
    print(f"worker on {worker.workers.devices[0]} taking jobs from {worker.store.where}", flush=True)
    while not stop.wait(1.0):
        pass
    worker.stop(hurry)
    return 0
