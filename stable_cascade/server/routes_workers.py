"""``GET /v1/workers``: the workers on the job store — every host's, wherever the client's replica runs."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import APIRouter, Request

from stable_cascade.server.shared import Server

router = APIRouter(tags=["jobs"])


@router.get("/v1/workers")
async def workers(request: Request) -> dict[str, Any]:
    """Each worker: its host, pid, device, the models it keeps warm, the job it runs and its last
    heartbeat (``heartbeat_age``: seconds ago; a worker silent for longer than its lease has stopped,
    and its job goes back to the queue)."""
    server: Server = request.app.state.server
    return {"workers": [dataclasses.asdict(worker) for worker in server.store.workers()]}
