"""What a job attaches to the loaded models for its run only: its LoRAs, IP-Adapters and ControlNet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from stable_cascade.engine.loras import IPAdapterRef, LoraRef
from stable_cascade.engine.models import LoadedModels
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.pipelines.prior import StableCascadePriorPipeline


@contextlib.contextmanager
def attached_controlnet(
    pipe: StableCascadePriorPipeline | None, controlnet: tuple[ControlNet, Path] | None
) -> Iterator[None]:
    """The prior with the job's ControlNet for the job; what it held before afterwards."""
    if controlnet is None or pipe is None:
        yield
        return
    before = pipe.controlnet
    pipe.register_components(controlnet=controlnet[0])
    try:
        yield
    finally:
        pipe.register_components(controlnet=before)


class attached_loras:  # a context manager used as a function
    """Attach a job's LoRAs to the prior for the job and remove exactly those afterwards."""

    def __init__(self, models: LoadedModels, loras: tuple[LoraRef, ...]) -> None:
        self.pipe = models.prior_pipe
        self.loras = loras
        self.names: list[str] = []

    def __enter__(self) -> None:
        if not self.loras:
            return
        assert self.pipe is not None, "validation refuses LoRAs for reconstruct"
        try:
            for i, lora in enumerate(self.loras):
                self.names.append(self.pipe.load_lora_weights(lora.path, f"job_lora_{i}", lora.scale))
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.names and self.pipe is not None:
            self.pipe.delete_adapters(self.names)
            self.names = []


class attached_ip_adapters:  # a context manager used as a function
    """Attach a job's IP-Adapters to the prior for the job and detach exactly those afterwards (the
    prior is then as loaded, bit for bit: adapters never change its weights)."""

    def __init__(self, models: LoadedModels, adapters: tuple[IPAdapterRef, ...]) -> None:
        self.pipe = models.prior_pipe
        self.adapters = adapters
        self.names: list[str] = []

    def __enter__(self) -> None:
        if not self.adapters:
            return
        assert self.pipe is not None, "validation refuses IP-Adapters for reconstruct"
        try:
            for i, adapter in enumerate(self.adapters):
                self.names.append(
                    self.pipe.load_ip_adapter(adapter.path, adapter.scale, f"job_ip_adapter_{i}")
                )
        except BaseException:
            self.__exit__()
            raise

    def __exit__(self, *exc: object) -> None:
        if self.names and self.pipe is not None:
            self.pipe.unload_ip_adapter(self.names)
            self.names = []
