"""What the routes share: the :class:`Server` (settings, store, live news, workers), the refusal of a
request (:class:`RequestError`, answered in A1111's error shape) and reading a JSON body."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from stable_cascade.server.config import ServerConfig
from stable_cascade.server.hub import Hub
from stable_cascade.server.store import Store
from stable_cascade.server.worker import Workers

MODEL_SETTING = "sd_model_checkpoint"


class Server:
    """What the routes share: the settings, the store, the live news and the workers."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.store = Store(config.data, config.max_queue)
        self.hub = Hub()
        self.workers = Workers(self.store, self.hub, config.devices(), config.dtype)

    @property
    def model(self) -> str:
        """The model requests get when they name none (``sd_model_checkpoint``; kept across restarts)."""
        return self.store.setting(MODEL_SETTING) or self.config.model

    @model.setter
    def model(self, name: str) -> None:
        self.store.set_setting(MODEL_SETTING, name)


class RequestError(Exception):
    """A request the server refuses with ``status`` and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def error_response(status: int, message: str, kind: str = "Error") -> JSONResponse:
    """A1111's error shape (``error``, ``detail``) with our one-line message."""
    return JSONResponse({"error": kind, "detail": message}, status_code=status)


async def read_json(request: Request) -> Any:
    """The request body as JSON (``RequestError`` 400 when it is not)."""
    body = await request.body()
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise RequestError(400, f"the request body is not valid JSON: {error}") from None
