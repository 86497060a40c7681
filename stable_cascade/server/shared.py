"""What the routes share: the :class:`Server` (settings, store, live news, workers), the refusal of a
request (:class:`RequestError`, answered in A1111's error shape) and reading a JSON body."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from stable_cascade.engine import Engine, Job, ModelLibrary
from stable_cascade.server.config import ServerConfig
from stable_cascade.server.hub import Hub
from stable_cascade.server.inputs import Served
from stable_cascade.server.lock import DataLock
from stable_cascade.server.relay import Relay
from stable_cascade.server.store import Store, StoredJob
from stable_cascade.server.uploads import Upload, text_chunks
from stable_cascade.server.worker import Workers

logger = logging.getLogger(__name__)
MODEL_SETTING = "sd_model_checkpoint"


class Server:
    """What the routes share: the settings, the store, the live news and the workers.

    Made in the order that refuses a server before it touches anything: the devices (an engine per
    worker), then the data folder's lock (one server per folder; a PostgreSQL store takes any number
    of replicas, and leases keep their workers apart), then the store (checked readable).
    """

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.library = ModelLibrary(config.models)
        self.library.sources(config.model)  # a named model or one of the folder's checkpoints
        engines = [Engine(device=device, dtype=config.dtype) for device in config.devices()]
        self.lock = DataLock(config.data, config.host, config.port) if config.store is None else None
        try:
            self.store = Store(config.data, config.max_queue, url=config.store)
        except BaseException:
            self.close_lock()
            raise
        self.hub = Hub(self.store.last_event)
        self.relay = Relay(self.store, self.hub)
        self.workers = Workers(self.store, engines)

    def start(self) -> None:
        self.workers.start()
        self.relay.start()

    def submit(self, job: Job, upload: Upload | None, priority: int = 0) -> StoredJob:
        """Queue ``job`` (``RequestError`` 422 when it asks for more images than the server allows)."""
        if job.images > self.config.max_images:
            raise RequestError(
                422,
                f"the job asks for {job.images} images (batch size {job.batch_size} × count {job.count}; "
                f"A1111: batch_size × n_iter), more than this server's limit of {self.config.max_images} "
                "per request; split it into several requests (the limit is serve's --max-images-per-job)",
            )
        uploads = [Path(path).name for path in (job.control_image, job.mask) if path is not None]
        uploads += [Path(ref.path).name for ref in (*job.image_prompts, *job.negative_image_prompts)]
        name = None if upload is None else upload.name
        stored = self.store.add(job.to_dict(), name, priority, uploads)
        position = self.store.position(stored)
        logger.info("job %s queued (%d ahead): %s, %d image(s)", stored.id, position, job.task, job.images)
        return stored

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued job, or ask a running one's worker (wherever it runs) to stop after its
        current step; whether there was one to cancel."""
        if self.store.cancel_queued(job_id):
            logger.info("job %s cancelled while queued", job_id)
            return True
        return self.store.cancel_running(job_id) > 0

    def close(self) -> None:
        """Stop the workers (their running jobs go back to the queue) and the relay, close the store,
        free the data folder."""
        self.workers.stop()
        self.relay.stop()
        self.store.close()
        self.close_lock()

    def close_lock(self) -> None:
        if self.lock is not None:
            self.lock.release()

    @property
    def served(self) -> Served:
        """What requests' jobs are checked against now."""
        return Served(self.store, self.library, self.model)

    @property
    def model(self) -> str:
        """The model requests get when they name none (``sd_model_checkpoint``; kept across restarts)."""
        chosen = self.store.setting(MODEL_SETTING)
        return chosen if chosen in self.library.model_names() else self.config.model

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


async def read_png_chunks(request: Request) -> dict[str, str]:
    """The text chunks of the PNG a png-info request sends as ``{"image": <base64>}`` (not decoded)."""
    body = await read_json(request)
    if not isinstance(body, Mapping) or "image" not in body:
        raise RequestError(422, 'png-info takes {"image": <a base64 PNG>}')
    return await run_in_threadpool(text_chunks, body["image"])
