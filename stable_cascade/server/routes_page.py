"""The web page and what it asks for: what it offers (``/v1/info``, ``/v1/fields``), the stream of every
job's news (``/v1/events``), a PNG's settings (``/v1/png-info``), a prompt's tokens (``/v1/tokens``),
and the gallery's deletions and zip downloads."""

from __future__ import annotations

import dataclasses
import tempfile
import zipfile
from collections.abc import AsyncIterator, Iterator, Mapping
from importlib import resources
from typing import IO, Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from stable_cascade.engine import COMBINED_PRESETS, INFOTEXT_KEY, package_version, prompt_tokens, record_of
from stable_cascade.fields import BY_NAME
from stable_cascade.fields.schema import form_fields
from stable_cascade.server import a1111, models
from stable_cascade.server.hub import ALL, next_message
from stable_cascade.server.routes_jobs import KEEPALIVE_SECONDS, MAX_LIST, sse
from stable_cascade.server.shared import RequestError, Server, read_json, read_png_chunks
from stable_cascade.server.store import FINAL_STATES, QUEUED, RUNNING, Store

router = APIRouter(tags=["page"])
#: What the stream of every job sends with the queue's count.
STATE_CHANGES = ("queued", "started", "deleted", *FINAL_STATES)
ZIP_CHUNK = 1 << 20  # bytes per piece of a zip download
MAX_ZIP_IMAGES = 1000  # images in one zip download
ZIP_IN_MEMORY = 32 << 20  # bytes a zip is built in memory before it goes to a temporary file


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


@router.get("/v1/info")
async def info(request: Request) -> dict[str, Any]:
    """What the page offers: models (named ones and the models folder's checkpoints, with their native
    sizes, ControlNets and whether they are here), LoRAs, presets, samplers and the defaults."""
    server = _server(request)
    presets = {
        name: {stage: dataclasses.asdict(getattr(preset, stage)) for stage in ("prior", "decoder")}
        for name, preset in COMBINED_PRESETS.items()
    }
    return {
        "model": server.model,
        "models": await run_in_threadpool(models.model_info, server.library),
        "loras": list(server.library.loras),
        "controlnets": list(server.library.controlnets),
        "presets": presets,
        "samplers": a1111.sampler_list(),
        "version": package_version(),
    }


@router.get("/v1/fields")
async def fields() -> dict[str, Any]:
    """The job fields the page's form carries (the field table): how to build and check each control."""
    return {"fields": form_fields()}


@router.get("/v1/events")
async def events(request: Request) -> StreamingResponse:
    """Server-sent events of every job (previews left out), each with its ``id``; state changes
    (``queued``, ``started``, ``done``, ``failed``, ``cancelled``, ``deleted``) carry ``queue``: the
    jobs queued or running."""
    server = _server(request)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_all(server), media_type="text/event-stream", headers=headers)


async def _all(server: Server) -> AsyncIterator[str]:
    queue = server.hub.subscribe(ALL)
    try:
        yield sse({"type": "hello", "queue": server.store.count(QUEUED, RUNNING)})
        while True:
            message = await next_message(queue, KEEPALIVE_SECONDS)
            if message is None:
                yield ": keep-alive\n\n"
                continue
            if message["type"] in STATE_CHANGES:
                message = {**message, "queue": server.store.count(QUEUED, RUNNING)}
            yield sse(message)
    finally:
        server.hub.unsubscribe(ALL, queue)


@router.post("/v1/png-info")
async def png_info(request: Request) -> dict[str, Any]:
    """A PNG's settings, for the page to restore: ``{"image": <base64>}`` → its ``infotext`` and the
    ``job`` it records (or its infotext gives), with the models by name; ``error`` says why there is
    none."""
    server = _server(request)
    chunks = await read_png_chunks(request)
    try:
        record = record_of(chunks, "the image")
    except ValueError as error:
        return {"infotext": chunks.get(INFOTEXT_KEY), "job": None, "error": " ".join(str(error).split())}
    job = record.single_job().to_dict()
    return {"infotext": chunks.get(INFOTEXT_KEY) or record.infotext(), "job": job, "error": None} | (
        models.job_names(server.library, job)
    )


@router.post("/v1/tokens")
async def tokens(request: Request) -> dict[str, Any]:
    """A prompt's tokens as its model encodes it: ``{"prompt", "model"?, "emphasis"?}`` → ``tokens`` and
    ``capacity`` (AUTOMATIC1111's "12/75"; weighted prompts count in chunks of 75)."""
    server = _server(request)
    body = await read_json(request)
    if not isinstance(body, Mapping) or not isinstance(body.get("prompt"), str):
        raise RequestError(422, 'tokens takes {"prompt": <text>, "model": <a model>, "emphasis": <one>}')
    sources = models.model_arguments(server.library, body.get("model", server.model))["models"]
    emphasis = BY_NAME["emphasis"].choice(body.get("emphasis", "original"))
    count, capacity = await run_in_threadpool(prompt_tokens, sources, body["prompt"], emphasis)
    return {"tokens": count, "capacity": capacity}


@router.delete("/v1/gallery/{job_id}")
async def delete(request: Request, job_id: str) -> Response:
    """Delete a finished job and its images (a queued or running one: cancel it first)."""
    server = _server(request)
    stored = server.store.get(job_id)
    if stored is None:
        raise RequestError(404, f"no job {job_id!r}; list the jobs with GET /v1/jobs")
    if not await run_in_threadpool(server.store.delete, job_id):
        raise RequestError(409, f"job {job_id} is {stored.state}; cancel it before deleting it")
    return Response(status_code=204)


@router.get("/v1/images.zip")
async def images_zip(request: Request, ids: str) -> StreamingResponse:
    """The images of the jobs ``ids`` (comma-separated, at most 200; at most 1,000 images) as one zip."""
    server = _server(request)
    wanted = [job_id for job_id in ids.split(",") if job_id]
    if not 1 <= len(wanted) <= MAX_LIST:
        raise RequestError(422, f"ids must name 1 to {MAX_LIST} jobs, got {len(wanted)}")
    images = [(job_id, image) for job_id in wanted for image in server.store.images(job_id)]
    if not images:
        raise RequestError(404, "those jobs have no images")
    if len(images) > MAX_ZIP_IMAGES:
        raise RequestError(
            422, f"those jobs have {len(images):,} images; a zip holds at most {MAX_ZIP_IMAGES:,}"
        )
    archive = await run_in_threadpool(
        _zip, server.store, [(f"{j[:8]}-{i.n}-{i.seed}.png", j, i.n) for j, i in images]
    )
    headers = {"Content-Disposition": 'attachment; filename="stable-cascade-images.zip"'}
    return StreamingResponse(_pieces(archive), media_type="application/zip", headers=headers)


def _zip(store: Store, images: list[tuple[str, str, int]]) -> IO[bytes]:
    """The images (name, job, index) stored (PNGs are compressed already) in a zip, rewound."""
    archive = tempfile.SpooledTemporaryFile(max_size=ZIP_IN_MEMORY)  # noqa: SIM115  # _pieces closes it
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        for name, job_id, n in images:
            png = store.png(job_id, n)
            if png is not None:  # deleted meanwhile
                zipped.writestr(name, png)
    archive.seek(0)
    return archive  # type: ignore[return-value]  # a binary file


def _pieces(archive: IO[bytes]) -> Iterator[bytes]:
    with archive:
        while piece := archive.read(ZIP_CHUNK):
            yield piece


@router.get("/", include_in_schema=False)
async def page() -> HTMLResponse:
    html = (resources.files("stable_cascade.server") / "static" / "index.html").read_text()
    return HTMLResponse(html)
