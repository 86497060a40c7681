"""``stable-cascade serve``: an AUTOMATIC1111-compatible HTTP API, a native jobs API with a durable
queue, and a web page, all running jobs through the engine; ``stable-cascade worker``: workers of a
shared queue on other processes and hosts."""

from stable_cascade.server.app import create_app
from stable_cascade.server.config import ServerConfig, default_data_dir, is_loopback, locate_store
from stable_cascade.server.standalone import WorkerConfig, WorkerProcess

__all__ = [
    "ServerConfig",
    "WorkerConfig",
    "WorkerProcess",
    "create_app",
    "default_data_dir",
    "is_loopback",
    "locate_store",
]
