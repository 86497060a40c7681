"""The server's settings and the checks made before it binds a socket."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from pathlib import Path

from stable_cascade.fields import BY_NAME, DTYPES

DEFAULT_PORT = 7860  # AUTOMATIC1111's port, so its clients find the server where they expect it
DEFAULT_MAX_QUEUE = 100
DEFAULT_MAX_BODY = 16 * 1024 * 1024  # bytes; an init image of 1024x1024 as base64 PNG is ~4 MB
DEFAULT_MAX_IMAGES = 100  # per request (batch size × count): more would hold the worker for hours
MAX_PORT = 65535


def default_data_dir() -> Path:
    """``$XDG_DATA_HOME/stable-cascade`` (``~/.local/share/stable-cascade`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "stable-cascade"


def locate_store(store: str | None, data: Path | None) -> tuple[Path, str | None]:
    """``--store`` and ``--data`` → (the data folder, the PostgreSQL URL or None): a ``--store`` that
    is a folder is the data folder (and the store in it)."""
    if store is not None and "://" in store:
        if not store.startswith(("postgresql://", "postgres://")):
            raise ValueError(
                f"--store must be a postgresql:// URL or a data folder, got {store.split('://')[0]}://…"
            )
        return data or default_data_dir(), store
    if store is not None and data is not None and Path(store) != data:
        raise ValueError("with a data folder as --store, --data is that folder; give one of them")
    return (Path(store) if store is not None else data or default_data_dir()), None


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    """What ``stable-cascade serve`` was asked for."""

    model: str = "full"
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: str | None = None
    data: Path = dataclasses.field(default_factory=default_data_dir)
    workers: int = 1
    insecure: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_queue: int = DEFAULT_MAX_QUEUE
    max_body: int = DEFAULT_MAX_BODY
    max_images: int = DEFAULT_MAX_IMAGES
    store: str | None = None  # a PostgreSQL URL; None: the job store is the data folder
    no_workers: bool = False  # an API replica only: workers run elsewhere (``stable-cascade worker``)
    models: Path | None = None  # the models folder: checkpoints, LoRAs, ControlNets by name

    def validate(self) -> None:
        """Raise a one-line ``ValueError`` for settings the server cannot run with."""
        if self.models is None:  # else the folder's checkpoints are names too: the server checks it
            BY_NAME["model"].choice(self.model, what="model")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; expected one of {', '.join(DTYPES)}")
        for name, value, low in (
            ("--workers", self.workers, 1),
            ("--max-queue", self.max_queue, 1),
            ("--max-images-per-job", self.max_images, 1),
            ("--max-body-mb (in bytes)", self.max_body, 1),
        ):
            if value < low:
                raise ValueError(f"{name} must be at least {low}, got {value}")
        if self.store is not None:
            locate_store(self.store, self.data)
        if not 1 <= self.port <= MAX_PORT:
            raise ValueError(f"--port must be between 1 and {MAX_PORT}, got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("--api-key must not be empty; give a secret or leave the option out")
        if not is_loopback(self.host) and self.api_key is None and not self.insecure:
            raise ValueError(
                f"refusing to serve on {self.host} without --api-key: anyone who can reach it could use it; "
                "give --api-key KEY, or --insecure if the network is trusted"
            )

    def devices(self) -> list[str]:
        """One device per worker: ``cuda:0`` … ``cuda:N-1`` for several CUDA workers, else the device
        (none with ``no_workers``)."""
        if self.no_workers:
            return []
        if self.workers > 1 and self.device in ("cuda", "auto") and _cuda_devices() >= self.workers:
            return [f"cuda:{i}" for i in range(self.workers)]
        return [self.device] * self.workers


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name other than localhost
        return False


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
