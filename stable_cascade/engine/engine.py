"""The engine: runs jobs on cached models and reports what happens as events.

    engine = Engine(device="cuda")
    for event in engine.run(Job.create(prompt="a cat", models=ModelSources(model="demo"))):
        if isinstance(event, ImageDone):
            save_png(event.image, f"{event.index}.png", event.record)

Models stay loaded between jobs, keyed by their sources, dtype and device (``max_loaded`` sets of
them). A job's LoRAs are attached for that job only and removed afterwards, so every job sees the
models exactly as loaded. One job runs at a time per engine; the work happens on a worker thread so
that step events arrive while a stage samples, and ``cancel`` stops a job between steps.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import PIL.Image
import torch

from stable_cascade.engine.control import ControlImages, ControlRef, open_control
from stable_cascade.engine.events import Event, Finished, Loading
from stable_cascade.engine.hashing import FileHasher, image_sha256, sha256_file
from stable_cascade.engine.job import DEFAULT_SIZE, DTYPES, Job, LoraRef, native_size
from stable_cascade.engine.models import (
    LoadedModels,
    Offload,
    load_models,
    place,
    resolve_device,
    resolve_dtype,
)
from stable_cascade.engine.record import model_label
from stable_cascade.engine.running import JobRun
from stable_cascade.engine.threads import configure_cpu_threads
from stable_cascade.loading.controlnets import controlnet_spec, load_controlnet
from stable_cascade.loading.sources import ModelSources
from stable_cascade.nn.controlnet import ControlNet
from stable_cascade.pipelines.prior import StableCascadePriorPipeline

logger = logging.getLogger(__name__)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_OFFLOADS = ("none", "model", "sequential")
_DONE = object()


class _Key(NamedTuple):
    sources: ModelSources
    dtype: torch.dtype
    device: str


@dataclasses.dataclass
class _Entry:
    models: LoadedModels
    prior: bool
    effnet: bool
    previewer: bool

    @property
    def parts(self) -> tuple[bool, bool, bool]:
        return self.prior, self.effnet, self.previewer


class Engine:
    """Loads models on demand, keeps up to ``max_loaded`` sets of them, and runs jobs on them."""

    def __init__(
        self,
        *,
        device: str = "auto",
        dtype: str = "auto",
        offload: str = "none",
        max_loaded: int = 1,
        progress_bars: bool = False,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
        if offload not in _OFFLOADS:
            raise ValueError(f"unknown offload {offload!r}; expected one of {', '.join(_OFFLOADS)}")
        if max_loaded < 1:
            raise ValueError(f"max_loaded must be at least 1, got {max_loaded}")
        self.device = resolve_device(device)
        self.dtype = dtype
        self.offload: Offload = offload  # type: ignore[assignment]  # checked above
        self.max_loaded = max_loaded
        self.progress_bars = progress_bars
        self.hasher = FileHasher()
        self._cache: collections.OrderedDict[_Key, _Entry] = collections.OrderedDict()
        self._controlnets: collections.OrderedDict[tuple[str, torch.dtype], tuple[ControlNet, Path]] = (
            collections.OrderedDict()
        )
        self._lock = threading.Lock()
        configure_cpu_threads()

    def torch_dtype(self, job_dtype: str = "auto") -> torch.dtype:
        """The dtype a job runs in: its own, else the engine's, else the device's best."""
        return resolve_dtype(job_dtype if job_dtype != "auto" else self.dtype, self.device)

    def load(
        self,
        models: ModelSources,
        dtype: str,
        *,
        prior: bool = True,
        effnet: bool = False,
        previewer: bool = False,
    ) -> LoadedModels:
        """The models ``models`` name in ``dtype``, placed on the engine's device (cached)."""
        return self._load(models, dtype, prior, effnet, previewer)[0]

    def unload(self) -> None:
        """Forget every loaded model (and free their memory)."""
        self._cache.clear()
        self._controlnets.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def run(
        self,
        job: Job,
        image: PIL.Image.Image | None = None,
        *,
        previews: bool = False,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        """The events of ``job`` (see :mod:`~stable_cascade.engine.events`); checked before any work."""
        image, controls = _checked_inputs(job, image)
        stop, taken = threading.Event(), threading.Semaphore(0)
        events: queue.Queue[object] = queue.Queue()

        def emit(event: Event) -> None:
            """Hand ``event`` over and wait until it is taken (so a cancel acts on the next step)."""
            events.put(event)
            while not taken.acquire(timeout=0.05) and not stop.is_set():
                pass

        def work() -> None:
            try:
                self._job(job, image, controls, previews, stop, emit)
            except BaseException as error:  # handed to the consumer's thread, which raises it
                events.put(error)
            events.put(_DONE)

        with self._lock:
            worker = threading.Thread(target=work, name="engine", daemon=True)
            worker.start()
            try:
                while (item := _next(events, cancel, stop)) is not _DONE:
                    if isinstance(item, BaseException):
                        raise item
                    yield item  # type: ignore[misc]  # an Event
                    if cancel is not None and cancel.is_set():
                        stop.set()
                    taken.release()
            finally:
                stop.set()  # the consumer may have left early
                worker.join()

    def _job(
        self,
        job: Job,
        image: PIL.Image.Image | None,
        controls: list[tuple[ControlRef, ControlImages]],
        previews: bool,
        stop: threading.Event,
        emit: Callable[[Event], None],
    ) -> None:
        start = time.perf_counter()
        super_resolution = any(control.control_type == "super_resolution" for control, _ in controls)
        models, loaded = self._load(
            job.models,
            job.dtype,
            job.task != "reconstruct",
            job.task in ("img2img", "reconstruct") or super_resolution,
            previews,
            emit,
        )
        controlnet = None
        if controls:
            controlnet, controlnet_loaded = self._controlnet(controls[0][0], job, emit)
            loaded = loaded or controlnet_loaded
        load_seconds = time.perf_counter() - start if loaded else 0.0
        native = native_size(job.models)
        if native is not None and native != DEFAULT_SIZE and (job.width, job.height) != (native, native):
            logger.warning(
                "the %s model was trained at %dx%d; at %dx%d its images are poorer",
                job.models.model,
                native,
                native,
                job.width,
                job.height,
            )
        hashes = self.model_sha256(models, controlnet[1] if controlnet is not None else None)
        run = JobRun(job, self.record_job(job), models, hashes, emit, stop, controls[0] if controls else None)
        with attached_loras(models, job.loras), _attached(models.prior_pipe, controlnet):
            run.check_stop()
            run.run(image, previews)
        emit(Finished(run.seconds["prior"], run.seconds["decoder"], load_seconds))

    def record_job(self, job: Job) -> Job:
        """The job as its images record it: the dtype it runs in named, the LoRA files' sha256."""
        return dataclasses.replace(
            job, dtype=_DTYPE_NAMES.get(self.torch_dtype(job.dtype), job.dtype), loras=_hashed(job.loras)
        )

    def model_sha256(self, models: LoadedModels, controlnet: Path | None = None) -> dict[str, str]:
        """The sha256 of the local files of ``models`` and a job's ControlNet by role (what records cite)."""
        files = dict(models.local_files)
        if controlnet is not None:
            files["controlnet"] = controlnet
        return {role: self.hasher.sha256(path) for role, path in files.items()}

    def _load(
        self,
        sources: ModelSources,
        dtype: str,
        prior: bool,
        effnet: bool,
        previewer: bool,
        emit: Callable[[Event], None] | None = None,
    ) -> tuple[LoadedModels, bool]:
        torch_dtype = self.torch_dtype(dtype)
        key = _Key(sources, torch_dtype, str(self.device))
        entry = self._cache.get(key)
        needed = (prior, effnet, previewer)
        if entry is not None and all(has or not need for has, need in zip(entry.parts, needed, strict=True)):
            self._cache.move_to_end(key)
            return entry.models, False
        if entry is not None:  # loaded without a part this job needs: load again with it
            prior, effnet, previewer = (
                prior or entry.prior,
                effnet or entry.effnet,
                previewer or entry.previewer,
            )
            del self._cache[key]
        while len(self._cache) >= self.max_loaded:
            self._cache.popitem(last=False)
        if emit is not None:
            emit(Loading(model_label(sources)))
        models = load_models(
            sources, torch_dtype=torch_dtype, prior=prior, effnet=effnet, previewer=previewer
        )
        place(models.pipeline, self.device, self.offload)
        for pipe, name in ((models.prior_pipe, "Stage C"), (models.decoder_pipe, "Stage B")):
            if pipe is not None:
                pipe.set_progress_bar_config(desc=name, disable=not self.progress_bars)
        self._cache[key] = _Entry(models, prior, effnet, previewer)
        return models, True

    def _controlnet(
        self, control: ControlRef, job: Job, emit: Callable[[Event], None]
    ) -> tuple[tuple[ControlNet, Path], bool]:
        """The job's ControlNet (cached by its file and dtype) and its local path; whether it loaded."""
        spec = controlnet_spec(control.controlnet, job.models.bundle)
        key = (spec, self.torch_dtype(job.dtype))
        if key in self._controlnets:
            self._controlnets.move_to_end(key)
            return self._controlnets[key], False
        while len(self._controlnets) >= self.max_loaded:
            self._controlnets.popitem(last=False)
        emit(Loading(f"ControlNet {control.controlnet}"))
        model, path = load_controlnet(spec, key[1])
        if self.offload != "model":  # with model offload the pipeline moves it when it runs
            model.to(self.device)
        self._controlnets[key] = (model.eval(), path)
        return self._controlnets[key], True


def _next(events: queue.Queue[object], cancel: threading.Event | None, stop: threading.Event) -> object:
    """The worker's next item, setting ``stop`` as soon as ``cancel`` is set meanwhile."""
    while True:
        try:
            return events.get(timeout=0.05)
        except queue.Empty:
            if cancel is not None and cancel.is_set():
                stop.set()


def check_inputs(job: Job, image: PIL.Image.Image | None) -> PIL.Image.Image | None:
    """Validate ``job``, its control images and its input image (given when needed, the one the job
    names); the image in RGB."""
    return _checked_inputs(job, image)[0]


def _checked_inputs(
    job: Job, image: PIL.Image.Image | None
) -> tuple[PIL.Image.Image | None, list[tuple[ControlRef, ControlImages]]]:
    """:func:`check_inputs`, and the job's control images, opened and checked once."""
    job.validate()
    controls = [(control, open_control(control)) for control in job.controls]
    if job.task == "txt2img":
        if image is not None:
            raise ValueError("txt2img takes no input image; use img2img, variation or reconstruct")
        return None, controls
    if image is None:
        raise ValueError(f"{job.task} needs an input image; pass the image the job was made for")
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"the input image must be a PIL image, got {type(image).__name__}")
    if image_sha256(image) != job.input_image_sha256:
        raise ValueError(
            f"the input image is not the one the job names (sha256 {str(job.input_image_sha256)[:12]}…); "
            "create the job with input_image_sha256=image_sha256(image)"
        )
    for lora in job.loras:
        if not _exists(lora):
            raise ValueError(f"LoRA file {lora.path} does not exist")
    return image.convert("RGB"), controls


def _exists(lora: LoraRef) -> bool:
    return Path(lora.path).is_file()


def _hashed(loras: tuple[LoraRef, ...]) -> tuple[LoraRef, ...]:
    """The LoRAs with their files' sha256 (warning where a recorded one differs)."""
    hashed = []
    for lora in loras:
        digest = sha256_file(lora.path)
        if lora.sha256 is not None and lora.sha256 != digest:
            logger.warning("LoRA %s differs from the one recorded (sha256 %s…)", lora.path, lora.sha256[:12])
        hashed.append(dataclasses.replace(lora, sha256=digest))
    return tuple(hashed)


@contextlib.contextmanager
def _attached(
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
