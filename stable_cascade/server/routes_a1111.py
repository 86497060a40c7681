"""AUTOMATIC1111's ``/sdapi/v1`` endpoints that make images and follow them: txt2img, img2img,
progress, interrupt, skip and options (see :mod:`stable_cascade.server.a1111` for the mapping; the
listings are :mod:`stable_cascade.server.routes_lists`)."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from stable_cascade.engine import Job
from stable_cascade.server import a1111, models
from stable_cascade.server.controls import a1111_controlnet, a1111_inpainting
from stable_cascade.server.hub import next_message
from stable_cascade.server.inputs import PLACEHOLDER, checked_job
from stable_cascade.server.shared import RequestError, Server, error_response, read_json
from stable_cascade.server.store import FAILED, FINAL_STATES, QUEUED, RUNNING, StoredJob
from stable_cascade.server.uploads import Upload, decode_image, peek_image, staged

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
WAIT_SECONDS = 5.0


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


@router.post("/txt2img")
async def txt2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=False)


@router.post("/img2img")
async def img2img(request: Request) -> JSONResponse:
    return await _generate(request, img2img=True)


async def _generate(request: Request, img2img: bool) -> JSONResponse:
    """Queue the request's job like any other, wait for it, answer with its images."""
    server = _server(request)
    body = await read_json(request)
    if not isinstance(body, Mapping):
        raise RequestError(422, f"the request body must be a JSON object, got {type(body).__name__}")
    with staged() as uploads:  # a refused request keeps none of its uploads
        job, upload = await run_in_threadpool(uploads.run, _job, server, body, img2img)
        stored = server.submit(job, upload)
    stored = await wait(server, stored)
    if stored.state == FAILED:
        return error_response(500, stored.error or "the job failed", "JobFailed")
    images = server.store.images(stored.id)
    encoded = [base64.b64encode(server.store.png(stored.id, image.n) or b"").decode() for image in images]
    parameters = {k: v for k, v in body.items() if k not in ("init_images", "mask", "alwayson_scripts")}
    infotexts = [image.infotext for image in images]
    name = server.library.name_of(job.models) or job.model
    return JSONResponse(
        {"images": encoded, "parameters": parameters, "info": a1111.info(job, infotexts, stored.id, name)}
    )


def _job(server: Server, body: Mapping[str, Any], img2img: bool) -> tuple[Job, Upload | None]:
    """The request's job; its fields are checked before any upload is decoded."""
    served = server.served
    size = peek_image(a1111.check_img2img(body), "init_images[0]") if img2img else None
    Job.create(**a1111.job_arguments(body, served, PLACEHOLDER if img2img else None), image_size=size)
    upload = decode_image(a1111.check_img2img(body), server.store, "init_images[0]") if img2img else None
    arguments = a1111.job_arguments(body, served, None if upload is None else upload.sha256)
    bundle = arguments["models"].bundle.name
    controls = [
        control
        for control in (
            a1111_inpainting(body, upload, server.store, bundle) if upload is not None else None,
            a1111_controlnet(body, server.store, server.library),
        )
        if control is not None
    ]
    return checked_job({**arguments, "controls": controls}, upload, served), upload


async def wait(server: Server, stored: StoredJob) -> StoredJob:
    """``stored`` once it has finished (done, failed or cancelled)."""
    queue = server.hub.subscribe(stored.id)
    try:
        while True:
            current = server.store.get(stored.id)
            assert current is not None
            if current.state in FINAL_STATES:
                return current
            message = await next_message(queue, WAIT_SECONDS)  # the store is read again meanwhile
            if message is None:
                continue
            while message["type"] not in FINAL_STATES and not queue.empty():
                message = queue.get_nowait()
    finally:
        server.hub.unsubscribe(stored.id, queue)


@router.get("/progress")
async def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
    server = _server(request)
    jobs = server.store.count(QUEUED, RUNNING)
    current = server.store.current()
    if current is None:
        return a1111.progress(0.0, 0.0, 0, 0, jobs, None)
    live = current[1]
    preview = None
    if live.preview is not None and not skip_current_image:
        preview = base64.b64encode(live.preview).decode()
    return a1111.progress(live.fraction, live.eta(), live.step, live.steps, jobs, preview, live.skipping)


@router.post("/interrupt")
async def interrupt(request: Request) -> dict[str, Any]:
    """Stop the running job(s) after the current step; their finished images are kept."""
    return {"interrupted": _server(request).store.cancel_running()}


@router.post("/skip")
async def skip(request: Request) -> dict[str, Any]:
    """Skip the image (batch) being made; the job goes on with its next one."""
    return {"skipped": _server(request).store.skip_running()}


@router.get("/options")
async def get_options(request: Request) -> dict[str, Any]:
    return {
        "sd_model_checkpoint": _server(request).model,
        "samples_format": "png",
        "CLIP_stop_at_last_layers": 1,
        "emphasis": "Original",
    }


@router.post("/options")
async def set_options(request: Request) -> None:
    """Takes ``sd_model_checkpoint`` (the model of requests that name none); other options are ignored."""
    body = await read_json(request)
    if not isinstance(body, Mapping):
        raise RequestError(422, "the options must be a JSON object")
    if "sd_model_checkpoint" in body:
        server = _server(request)
        name = body["sd_model_checkpoint"]
        models.model_arguments(server.library, name)  # a model's name, or 422
        server.model = name.split(" [", 1)[0].strip()
