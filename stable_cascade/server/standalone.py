"""``stable-cascade worker``: a process that only pulls jobs from a store and runs them (one per GPU),
beside any number of API replicas (``serve --no-workers``) on any hosts that reach the same store."""

from __future__ import annotations

import dataclasses
import logging
import threading
from pathlib import Path

from stable_cascade.engine import Engine, Job
from stable_cascade.fields import BY_NAME, DTYPES
from stable_cascade.server.config import DEFAULT_MAX_QUEUE
from stable_cascade.server.store import LEASE_SECONDS, Store, is_url
from stable_cascade.server.worker import Workers

logger = logging.getLogger(__name__)
MIN_LEASE = 1.0  # seconds: heartbeats come three times a lease, and must not crowd the store


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    """What ``stable-cascade worker`` was asked for. ``store``: a PostgreSQL URL or a data folder;
    ``data``: this host's folder for uploads fetched from a PostgreSQL store."""

    store: str
    data: Path
    device: str = "auto"
    dtype: str = "auto"
    models: tuple[str, ...] = ()
    lease: float = LEASE_SECONDS
    grace: float = 20.0

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for settings the worker cannot run with."""
        for model in self.models:
            BY_NAME["model"].choice(model, what="model")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if not self.lease >= MIN_LEASE:
            raise ValueError(f"--lease must be at least {MIN_LEASE:g} seconds, got {self.lease}")
        if not self.grace >= 0:
            raise ValueError(f"--grace must be 0 seconds or more, got {self.grace}")


class WorkerProcess:
    """The engine (its models warmed), the store and the worker thread of one ``worker`` process."""

    def __init__(self, config: WorkerConfig) -> None:
        config.validate()
        self.config = config
        engine = Engine(device=config.device, dtype=config.dtype)
        url = config.store if is_url(config.store) else None
        folder = config.data if url is not None else Path(config.store)
        self.store = Store(folder, DEFAULT_MAX_QUEUE, url=url)
        try:
            for model in config.models:
                warm(engine, model)
        except BaseException:
            self.store.close()
            raise
        self.workers = Workers(self.store, [engine], kind="worker", lease=config.lease, models=config.models)

    def start(self) -> None:
        self.workers.start()

    def stop(self, hurry: threading.Event | None = None) -> None:
        """Take no more jobs, let the running one finish within the grace period (or until ``hurry``
        is set), else queue it again for another worker; then close the store."""
        self.workers.stop(self.config.grace, hurry=hurry)
        self.store.close()


def warm(engine: Engine, model: str) -> None:
    """Load ``model``'s parts on the engine's device by running one step of each stage."""
    logger.info("warming %s on %s", model, engine.device)
    job = Job.create(model=model, prompt="warm-up", prior_steps=1, decoder_steps=1)
    for _ in engine.run(job, previews=True):
        pass
