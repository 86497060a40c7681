"""``serve``: the HTTP server (the A1111-compatible API, the jobs API and the web page)."""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path
from typing import Any

from stable_cascade.fields import BY_NAME, DTYPES

MODEL = BY_NAME["model"]


def add_commands(commands: Any, common: argparse.ArgumentParser) -> None:
    description = (
        "serve the web page at / , AUTOMATIC1111's API at /sdapi/v1 and the jobs API at /v1; "
        "jobs and images are kept in --data and survive restarts"
    )
    parser = commands.add_parser(
        "serve", parents=[common], help="run the HTTP server", description=description
    )
    parser.add_argument(
        "--model",
        default=MODEL.default,
        help=f"default model: {', '.join(MODEL.choices)} or a checkpoint of --models ({MODEL.default})",
    )
    parser.add_argument(
        "--models",
        type=Path,
        metavar="DIR",
        help="a models folder: its checkpoints/, loras/ and controlnet/ are offered by name (README)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1: this machine only)")
    parser.add_argument("--port", type=_port, default=7860, help="port, 1-65535 (7860, A1111's)")
    parser.add_argument("--api-key", help="require this key (Bearer token, or the password of basic auth)")
    parser.add_argument(
        "--data", type=Path, help="folder of the job queue and images (~/.local/share/stable-cascade)"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker threads, one per device (1)")
    parser.add_argument(
        "--store", help="the job store: postgresql://user@host/db (shared by replicas), or a data folder"
    )
    parser.add_argument(
        "--no-workers", action="store_true", help="run no jobs here: an API replica ('stable-cascade worker')"
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow a non-loopback --host without --api-key"
    )
    parser.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda:N")
    parser.add_argument(
        "--dtype", choices=DTYPES, default="auto", help="auto: bf16 on CUDA with bf16, else fp32"
    )
    parser.add_argument("--max-queue", type=int, default=100, help="most jobs waiting; more get 429 (100)")
    parser.add_argument(
        "--max-body-mb", type=_megabytes, default=16.0, help="largest request body in MiB (16)"
    )
    parser.add_argument(
        "--max-images-per-job",
        type=int,
        default=100,
        help="most images one request may ask for (batch size × count); more get 422 (100)",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from stable_cascade.server import ServerConfig, create_app, locate_store

    data, url = locate_store(args.store, args.data)
    config = ServerConfig(
        model=args.model,
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        data=data,
        store=url,
        no_workers=args.no_workers,
        workers=args.workers,
        insecure=args.insecure,
        device=args.device,
        dtype=args.dtype,
        max_queue=args.max_queue,
        max_body=int(args.max_body_mb * 1024 * 1024),
        max_images=args.max_images_per_job,
        models=args.models,
    )
    if logging.getLogger("stable_cascade").getEffectiveLevel() > logging.INFO:
        logging.getLogger("stable_cascade").setLevel(logging.INFO)
    app = create_app(config)
    where = app.state.server.store.where
    print(f"serving {config.model} on http://{config.host}:{config.port}/ (jobs in {where})", flush=True)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning", timeout_graceful_shutdown=5)
    return 0


def _port(text: str) -> int:
    """A TCP port number (1-65535)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number (1-65535), got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is between 1 and 65535, got {port}")
    return port


def _megabytes(text: str) -> float:
    """A positive, finite size in MiB."""
    try:
        size = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in MiB such as 16 or 0.5, got {text!r}") from None
    if not math.isfinite(size) or size * 1024 * 1024 < 1:
        raise argparse.ArgumentTypeError(f"expected a finite size in MiB above 0 (16, 0.5), got {text!r}")
    return size
