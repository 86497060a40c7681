"""The FastAPI application: shared state, access control, request limits, errors, one log line per
request, the API's documentation (``/docs``, Swagger UI served from the installed ``swagger-ui-bundle``
package: it works offline), and start/stop."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

import swagger_ui_bundle
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from stable_cascade.engine import available
from stable_cascade.server import routes_a1111, routes_jobs, routes_lists, routes_page, routes_workers
from stable_cascade.server.config import ServerConfig
from stable_cascade.server.inputs import one_line
from stable_cascade.server.shared import RequestError, Server, error_response
from stable_cascade.server.store import QueueFull, StoreError
from stable_cascade.server.words import SERVER_OFFLINE_HINT, for_users

logger = logging.getLogger(__name__)
access = logging.getLogger("stable_cascade.server.access")
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: What anyone may fetch without the key: the page, the API's documentation and their files (they hold
#: no data).
PUBLIC_PATHS = ("/", "/favicon.ico", "/docs", "/openapi.json")
PUBLIC_PREFIXES = ("/static/", "/docs-assets/")


def create_app(config: ServerConfig) -> FastAPI:
    """The application serving ``config``; its workers run while the application does."""
    config.validate()
    server = Server(config)
    if config.model != server.model:
        logger.info("default model %s (chosen with sd_model_checkpoint)", server.model)
    if not available(server.library.sources(server.model)):
        logger.warning(
            "the default model %s is not on this machine: its jobs download it first, or fail offline (%s)",
            server.model,
            SERVER_OFFLINE_HINT,
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.hub.bind(asyncio.get_running_loop())
        server.start()
        try:
            yield
        finally:
            server.close()

    app = FastAPI(title="stable-cascade", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    for router in (routes_a1111.router, routes_lists.router, routes_lists.controlnet):
        app.include_router(router)
    app.include_router(routes_jobs.router)
    app.include_router(routes_workers.router)
    app.include_router(routes_page.router)
    static = resources.files("stable_cascade.server") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    app.mount("/docs-assets", StaticFiles(directory=swagger_ui_bundle.swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json",
            title="stable-cascade API",
            swagger_js_url="/docs-assets/swagger-ui-bundle.js",
            swagger_css_url="/docs-assets/swagger-ui.css",
            swagger_favicon_url="/docs-assets/favicon-32x32.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from elsewhere
        )

    _add_error_handlers(app)
    app.add_middleware(_Guard, api_key=config.api_key, max_body=config.max_body)  # type: ignore[arg-type]
    return app


def _add_error_handlers(app: FastAPI) -> None:
    async def refused(request: Request, error: Exception) -> JSONResponse:
        status = error.status if isinstance(error, RequestError) else 422
        if isinstance(error, QueueFull):
            status = 429
        message = one_line(error) if isinstance(error, RequestError) else for_users(str(error))
        return error_response(status, message, type(error).__name__)

    async def malformed(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return error_response(422, _first_problem(error), "RequestValidationError")

    async def unavailable(request: Request, error: Exception) -> JSONResponse:
        message = f"the job store is unavailable ({one_line(error)}); try again shortly"
        return error_response(503, message, "StoreUnavailable")

    for kind in (RequestError, ValueError, QueueFull):
        app.add_exception_handler(kind, refused)
    app.add_exception_handler(RequestValidationError, malformed)
    for failure in (sqlite3.Error, StoreError):
        app.add_exception_handler(failure, unavailable)


def _first_problem(error: RequestValidationError) -> str:
    """FastAPI's list of validation problems as one line: the first, where it is and what was sent."""
    problems = error.errors()
    if not problems:
        return "the request is malformed"
    first = problems[0]
    where = " ".join(str(part) for part in first.get("loc", ()))
    given = f", got {_short(first['input'])}" if "input" in first else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return one_line(ValueError(f"{where}: {first.get('msg', 'invalid')}{given}{more}"))


class _Guard:
    """Pure ASGI middleware: the API key on every path but the page's, the body size limit, and one
    log line per request (method, path, status, milliseconds; when its response has ended)."""

    def __init__(self, app: ASGIApp, api_key: str | None, max_body: int) -> None:
        self.app = app
        self.api_key = api_key
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def sent(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self._guarded(scope, receive, sent)
        finally:
            milliseconds = (time.perf_counter() - start) * 1000
            access.info("%s %s %d %.0f ms", scope["method"], scope["path"], status[0], milliseconds)

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path = scope["path"]
        if self.api_key is not None and not _public(path) and not self._authorised(headers):
            response = error_response(401, "a valid API key is required: send 'Authorization: Bearer KEY'")
            # Bearer, not Basic: a Basic challenge makes browsers open a login dialog over the page
            response.headers["WWW-Authenticate"] = 'Bearer realm="stable-cascade"'
            await response(scope, receive, send)
            return
        length = headers.get("content-length", "0")
        if not length.isdigit() or int(length) > self.max_body:
            await self._too_large(scope, receive, send)
            return
        await self.app(scope, self._counting(receive), send)

    def _authorised(self, headers: dict[str, str]) -> bool:
        assert self.api_key is not None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            given = credentials.strip()
        elif scheme.lower() == "basic":  # A1111 clients send --api-auth user:password this way
            try:
                given = base64.b64decode(credentials, validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError, ValueError):
                return False
        else:
            given = headers.get("x-api-key", "")
        return hmac.compare_digest(given.encode(), self.api_key.encode())

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the server's limit of {self.max_body:,} bytes"
        await error_response(413, message)(scope, receive, send)

    def _counting(self, receive: Receive) -> Receive:
        """``receive`` that stops a body (sent without a length) once it passes the limit."""
        seen = 0

        async def counted() -> MutableMapping[str, Any]:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_body:
                raise RequestError(
                    413, f"the request body is larger than the limit of {self.max_body:,} bytes"
                )
            return message

        return counted


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)
