"""The native jobs API (``/v1/jobs``): submit, list, follow, cancel and fetch images (the page's own
endpoints: :mod:`stable_cascade.server.routes_page`)."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from stable_cascade.fields.schema import request_schema
from stable_cascade.server import models
from stable_cascade.server.hub import next_message
from stable_cascade.server.inputs import native_job
from stable_cascade.server.shared import RequestError, Server, read_json
from stable_cascade.server.store import FINAL_STATES, QUEUED, RUNNING, StoredJob
from stable_cascade.server.uploads import staged

router = APIRouter(tags=["jobs"])
MAX_LIST = 200
MAX_SEQ = 2**63 - 1  # SQLite's largest integer
KEEPALIVE_SECONDS = 10.0
FINAL_NEWS_SECONDS = 2.0  # how long a stream waits for a finished job's last news
MAX_PRIORITY = 1000


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


def _stored(server: Server, job_id: str) -> StoredJob:
    stored = server.store.get(job_id)
    if stored is None:
        raise RequestError(404, f"no job {job_id!r}; list the jobs with GET /v1/jobs")
    return stored


def describe(server: Server, stored: StoredJob) -> dict[str, Any]:
    """A job as the API shows it: state, place in the queue, progress, images and the job itself."""
    live = server.store.live(stored.id) if stored.state == RUNNING else None
    done = stored.state in FINAL_STATES
    now = time.time()
    until = (stored.finished or now) if done else now
    return {
        "id": stored.id,
        "state": stored.state,
        "position": server.store.position(stored) if stored.state == QUEUED else None,
        "progress": 1.0 if stored.state == "done" else (live.fraction if live else 0.0),
        "error": stored.error,
        "created": stored.created,
        "started": stored.started,
        "finished": stored.finished if done else None,
        "age_seconds": round(now - stored.created, 3),  # since it was queued
        "running_seconds": None if stored.started is None else round(until - stored.started, 3),
        "priority": stored.priority,
        "attempts": stored.attempts,
        "job": stored.job,
        **models.job_names(server.library, stored.job),
        "images": [
            {
                "n": image.n,
                "seed": image.seed,
                "url": f"/v1/jobs/{stored.id}/images/{image.n}",
                "infotext": image.infotext,
            }
            for image in server.store.images(stored.id)
        ],
    }


def _body() -> dict[str, Any]:
    """The schema of a job request: the field table's, and the queue's ``priority``."""
    schema = request_schema()
    schema["properties"]["priority"] = {
        "type": "integer",
        "minimum": -MAX_PRIORITY,
        "maximum": MAX_PRIORITY,
        "default": 0,
        "description": "higher runs first; equal priorities in the order they came",
    }
    return schema


@router.post(
    "/v1/jobs",
    status_code=201,
    openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": _body()}}}},
)
async def submit(request: Request) -> dict[str, Any]:
    server = _server(request)
    body = await read_json(request)
    priority = _priority(body)
    with staged() as uploads:  # a refused request keeps none of its uploads
        job, upload = await run_in_threadpool(uploads.run, native_job, body, server.served)
        stored = server.submit(job, upload, priority)
    return describe(server, stored)


def _priority(body: object) -> int:
    """Pop the body's ``priority`` (higher runs first; 0 when not given)."""
    if not isinstance(body, dict) or "priority" not in body:
        return 0
    priority = body.pop("priority")
    if not isinstance(priority, int) or isinstance(priority, bool) or abs(priority) > MAX_PRIORITY:
        raise RequestError(
            422, f"priority must be a whole number from -{MAX_PRIORITY} to {MAX_PRIORITY}, got {priority!r}"
        )
    return priority


@router.get("/v1/jobs")
async def jobs(request: Request, limit: int = 50, before: int | None = None) -> dict[str, Any]:
    """The newest jobs first (``before``: a job's ``seq`` to page back from)."""
    server = _server(request)
    if not 1 <= limit <= MAX_LIST:
        raise RequestError(422, f"limit must be between 1 and {MAX_LIST}, got {limit}")
    if before is not None and not 0 <= before <= MAX_SEQ:
        raise RequestError(422, f"before must be a job's seq (0 to {MAX_SEQ}), got {before}")
    stored = server.store.recent(limit, before)
    return {"jobs": [describe(server, s) | {"seq": s.seq} for s in stored]}


@router.get("/v1/jobs/{job_id}")
async def job(request: Request, job_id: str) -> dict[str, Any]:
    server = _server(request)
    return describe(server, _stored(server, job_id))


@router.delete("/v1/jobs/{job_id}")
async def cancel(request: Request, job_id: str) -> JSONResponse:
    """Cancel a queued or running job (a running one stops after its current step)."""
    server = _server(request)
    stored = _stored(server, job_id)
    if stored.state in FINAL_STATES or not server.cancel(job_id):
        raise RequestError(409, f"job {job_id} has already finished ({stored.state}); nothing to cancel")
    return JSONResponse({"id": job_id, "state": "cancelling"}, status_code=202)


@router.get("/v1/jobs/{job_id}/images/{n}")
async def image(request: Request, job_id: str, n: int) -> Response:
    server = _server(request)
    _stored(server, job_id)
    seeds = {stored_image.n: stored_image.seed for stored_image in server.store.images(job_id)}
    png = server.store.png(job_id, n) if n in seeds else None
    if png is None:
        raise RequestError(404, f"job {job_id} has no image {n} (yet)")
    headers = {"Content-Disposition": f'attachment; filename="{job_id[:8]}-{seeds[n]}.png"'}
    return Response(png, media_type="image/png", headers=headers)


@router.get("/v1/jobs/{job_id}/events")
async def events(request: Request, job_id: str) -> StreamingResponse:
    """Server-sent events: ``queued`` (position), ``started``, ``loading``, ``progress``, ``preview``
    (base64 PNG), ``image``, then one of ``done``, ``failed``, ``cancelled``."""
    server = _server(request)
    _stored(server, job_id)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_stream(server, job_id), media_type="text/event-stream", headers=headers)


async def _stream(server: Server, job_id: str) -> AsyncIterator[str]:
    """The job's news, ending with its final state. The final state's news comes after all the job's
    other news (whichever replica relays it), so the stream ends when it comes; when the store says the
    job ended but no such news comes (it ended as the stream began), the store's word ends it."""
    stored = _stored(server, job_id)
    if stored.state in FINAL_STATES:
        yield sse({"type": stored.state, "error": stored.error})
        return
    queue = server.hub.subscribe(job_id)
    try:
        position, ended = None, None
        while True:
            stored = _stored(server, job_id)
            if stored.state in FINAL_STATES:
                ended = ended or time.monotonic()
                if time.monotonic() - ended > FINAL_NEWS_SECONDS:
                    yield sse({"type": stored.state, "error": stored.error})
                    return
            elif stored.state == QUEUED and server.store.position(stored) != position:
                position = server.store.position(stored)
                yield sse({"type": "queued", "position": position})
            elif stored.state == RUNNING:
                position = None
            waiting = 0.25 if ended else 1.0 if stored.state == QUEUED else KEEPALIVE_SECONDS
            message = await next_message(queue, waiting)
            if message is None:
                yield ": keep-alive\n\n"
            elif message["type"] in FINAL_STATES:
                yield sse({"type": message["type"], "error": message.get("error")})
                return
            elif message["type"] != QUEUED:  # the queue's positions are read from the store above
                yield sse(message)
    finally:
        server.hub.unsubscribe(job_id, queue)


def sse(message: dict[str, Any]) -> str:
    return f"event: {message['type']}\ndata: {json.dumps(message)}\n\n"
