"""What AUTOMATIC1111 clients ask about besides images, in its shapes: models, LoRAs, samplers,
schedulers, scripts, embeddings, memory, the server's flags, PNG Info, and the ControlNet extension's
``/controlnet/*`` listings (so ControlNet-aware clients find the ControlNets)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from stable_cascade.engine import INFOTEXT_KEY, get_bundle, memory_report, package_version
from stable_cascade.fields import infotext
from stable_cascade.fields.a1111 import A1111_SCHEDULERS
from stable_cascade.server import a1111, models
from stable_cascade.server.config import is_loopback
from stable_cascade.server.controls import A1111_MODULES
from stable_cascade.server.shared import Server, read_png_chunks

router = APIRouter(prefix="/sdapi/v1", tags=["AUTOMATIC1111"])
controlnet = APIRouter(prefix="/controlnet", tags=["AUTOMATIC1111 ControlNet"])
#: The ControlNet extension's API version that its clients check for.
CONTROLNET_API_VERSION = 2


def _server(request: Request) -> Server:
    server: Server = request.app.state.server
    return server


@router.get("/sd-models")
async def sd_models(request: Request) -> list[dict[str, Any]]:
    return models.sd_models(_server(request).library)


@router.get("/loras")
async def loras(request: Request) -> list[dict[str, Any]]:
    return models.lora_list(_server(request).library)


@router.post("/refresh-checkpoints")
@router.post("/refresh-loras")
async def refresh(request: Request) -> None:
    """Read the models folder again (checkpoints, LoRAs and ControlNets alike)."""
    await run_in_threadpool(_server(request).library.refresh)


@router.get("/samplers")
async def samplers() -> list[dict[str, Any]]:
    return a1111.sampler_list()


@router.get("/schedulers")
async def schedulers() -> list[dict[str, Any]]:
    """AUTOMATIC1111's schedulers: each runs as Stable Cascade's own noise schedule."""
    return [
        {"name": name.lower().replace(" ", "_"), "label": name, "aliases": None, "default_rho": -1,
         "need_inner_model": False}
        for name in sorted(A1111_SCHEDULERS, key=lambda name: name != "Automatic")
    ]  # fmt: skip


@router.get("/scripts")
async def scripts() -> dict[str, list[str]]:
    return {"txt2img": ["controlnet"], "img2img": ["controlnet"]}


@router.get("/embeddings")
async def embeddings() -> dict[str, dict[str, Any]]:
    """Textual-inversion embeddings: none."""
    return {"loaded": {}, "skipped": {}}


@router.get("/memory")
async def memory() -> dict[str, Any]:
    return await run_in_threadpool(memory_report)


@router.get("/cmd-flags")
async def cmd_flags(request: Request) -> dict[str, Any]:
    """The server's settings, by ``serve``'s option names and AUTOMATIC1111's (never the API key)."""
    config = _server(request).config
    folder = config.models
    return {
        "api": True,
        "listen": not is_loopback(config.host),
        "port": config.port,
        "api_auth": config.api_key is not None,  # whether a key is needed; the key is not shown
        "data_dir": str(config.data),
        "ckpt_dir": None if folder is None else str(folder / "checkpoints"),
        "lora_dir": None if folder is None else str(folder / "loras"),
        "controlnet_dir": None if folder is None else str(folder / "controlnet"),
        "model": config.model,
        "models": None if folder is None else str(folder),
        "host": config.host,
        "workers": config.workers,
        "device": config.device,
        "dtype": config.dtype,
        "max_queue": config.max_queue,
        "max_body_mb": config.max_body / 1024 / 1024,
        "max_images_per_job": config.max_images,
        "version": package_version(),
    }


@router.post("/png-info")
async def png_info(request: Request) -> dict[str, Any]:
    """A PNG's ``parameters`` text (``info``), its other text chunks (``items``) and the text as
    AUTOMATIC1111 reads it (``parameters``); the image's pixels are not decoded."""
    chunks = await read_png_chunks(request)
    text = chunks.pop(INFOTEXT_KEY, "")
    return {"info": text, "items": chunks, "parameters": infotext.parameters(text) if text else {}}


@router.get("/upscalers")
@router.get("/sd-vae")
@router.get("/prompt-styles")
@router.get("/hypernetworks")
@router.get("/face-restorers")
async def empty_list() -> list[Any]:
    """Lists of what this server does not have, for clients that ask at start-up."""
    return []


@controlnet.get("/version")
async def controlnet_version() -> dict[str, int]:
    return {"version": CONTROLNET_API_VERSION}


@controlnet.get("/model_list")
async def controlnet_models(request: Request) -> dict[str, list[str]]:
    """The ControlNets requests may name: the default model's own, then the models folder's."""
    server = _server(request)
    bundle = get_bundle(server.library.sources(server.model).model or "full")
    return {"model_list": [name for name, _ in bundle.controlnets] + list(server.library.controlnets)}


@controlnet.get("/module_list")
async def controlnet_modules() -> dict[str, Any]:
    """The modules (preprocessors) units may name: Stable Cascade's ControlNets make their own control."""
    return {"module_list": list(A1111_MODULES), "module_detail": {}}
