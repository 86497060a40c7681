"""``stable-cascade serve``: an AUTOMATIC1111-compatible HTTP API, a native jobs API with a durable
queue, and a web page, all running jobs through the engine."""

from stable_cascade.server.app import create_app
from stable_cascade.server.config import ServerConfig, default_data_dir, is_loopback

__all__ = ["ServerConfig", "create_app", "default_data_dir", "is_loopback"]
