"""What a job attaches to the loaded models for its run only: its LoRAs and its ControlNet."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from stable_cascade.engine.loras import LoraRef, lora_stage
from stable_cascade.engine.models import LoadedModels
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.pipelines.decoder import StableCascadeDecoderPipeline
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
    """Attach a job's LoRAs for the job, each to the stage its file names (Stage C unless it says
    Stage B), and remove exactly those afterwards."""

    def __init__(self, models: LoadedModels, loras: tuple[LoraRef, ...]) -> None:
        self.models = models
        self.loras = loras
        self.names: list[tuple[StableCascadePriorPipeline | StableCascadeDecoderPipeline, str]] = []

    def __enter__(self) -> None:
        if not self.loras:
            return
        try:
            for i, lora in enumerate(self.loras):
                pipe = self._pipe(lora_stage(lora.path))
                self.names.append((pipe, pipe.load_lora_weights(lora.path, f"job_lora_{i}", lora.scale)))
        except BaseException:
            self.__exit__()
            raise

    def _pipe(self, stage: str) -> StableCascadePriorPipeline | StableCascadeDecoderPipeline:
        if stage == "decoder":
            return self.models.decoder_pipe
        assert self.models.prior_pipe is not None, "validation refuses LoRAs for reconstruct"
        return self.models.prior_pipe

    def __exit__(self, *exc: object) -> None:
        for pipe, name in reversed(self.names):
            pipe.delete_adapters([name])
        self.names = []
