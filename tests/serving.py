"""Start ``stable-cascade serve --model demo`` as a real process on 127.0.0.1 and a free port (and
``stable-cascade worker`` processes)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red circle on the left, on a white background"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def launch(command: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``command`` (a ``python -m stable_cascade`` one) as a process of this checkout, offline, on one
    thread, its output appended to ``log``."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    with log.open("ab") as output:
        return subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)


def sigkill(process: subprocess.Popen[bytes]) -> None:
    """SIGKILL, and wait for it to end."""
    process.send_signal(signal.SIGKILL)
    process.wait(30)


class ServerProcess:
    """``with ServerProcess(data) as server: httpx.get(server.url + "/v1/info")``."""

    def __init__(self, data: Path, *options: str, api_key: str | None = None) -> None:
        self.data = Path(data)
        self.options = list(options)
        self.api_key = api_key
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.data.parent / f"{self.data.name}-server-{self.port}.log"

    @property
    def headers(self) -> dict[str, str]:
        return {} if self.api_key is None else {"Authorization": f"Bearer {self.api_key}"}

    def start(self, timeout: float = 180.0) -> ServerProcess:
        command = [sys.executable, "-m", "stable_cascade", "serve", "--model", "demo", "--device", "cpu"]
        command += ["--data", str(self.data), "--port", str(self.port), *self.options]
        if self.api_key is not None:
            command += ["--api-key", self.api_key]
        self.process = launch(command, self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the server exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                if (
                    httpx.get(f"{self.url}/sdapi/v1/samplers", headers=self.headers, timeout=2).status_code
                    == 200
                ):
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"the server did not answer within {timeout:.0f} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crash or the OOM killer."""
        assert self.process is not None
        sigkill(self.process)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_for_job(server: ServerProcess, job_id: str, timeout: float = 120.0) -> dict:
    """The job once it has finished (polling GET /v1/jobs/{id})."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = httpx.get(f"{server.url}/v1/jobs/{job_id}", headers=server.headers, timeout=10).json()
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} did not finish within {timeout:.0f} s")


class WorkerProcess:
    """``stable-cascade worker --model demo --device cpu --store STORE`` as a real process."""

    def __init__(self, store: str, data: Path, *options: str) -> None:
        self.store = store
        self.data = Path(data)
        self.options = list(options)
        self.process: subprocess.Popen[bytes] | None = None
        self.log = self.data.parent / f"{self.data.name}-worker-{free_port()}.log"

    def start(self, timeout: float = 180.0) -> WorkerProcess:
        """Start it and wait until it takes jobs (its models warmed)."""
        command = [sys.executable, "-m", "stable_cascade", "worker", "--model", "demo", "--device", "cpu"]
        command += ["--store", self.store, "--data", str(self.data), *self.options]
        self.process = launch(command, self.log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"the worker exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            if "taking jobs" in self.log.read_text():
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"the worker did not start within {timeout:.0f} s:\n{self.log.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no chance to clean up, like a crash or the OOM killer."""
        assert self.process is not None
        sigkill(self.process)

    def kill_if_running(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, and its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return int(self.process.returncode)


def models_folder(root: Path) -> Path:
    """A models folder for ``serve --models``: the demo cascade again as checkpoint ``democopy``, a
    LoRA ``ink`` for the demo's Stage C (random, so it changes images) and the demo's ControlNet again
    as ``edges``."""
    import torch

    from stable_cascade.loading.bundles import DEMO_DIR
    from stable_cascade.lora import add_lora, save_lora
    from stable_cascade.lora.layers import lora_layers
    from stable_cascade.nn.unet import StableCascadeUNet

    for folder in ("checkpoints", "loras", "controlnet"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    (root / "checkpoints" / "democopy").symlink_to(DEMO_DIR)
    (root / "controlnet" / "edges").symlink_to(DEMO_DIR / "controlnet")
    unet = StableCascadeUNet.from_pretrained(str(DEMO_DIR / "prior" / "prior"))
    generator = torch.Generator().manual_seed(0)
    add_lora(unet, rank=4, generator=generator)
    for _, layer in lora_layers(unet):
        for adapter in layer.adapters().values():
            adapter.up.data.normal_(0, 0.2, generator=generator)
    save_lora(root / "loras" / "ink.safetensors", unet)
    return root
