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
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, get_args

import PIL.Image
import torch

from stable_cascade.engine.attach import attached_controlnet, attached_loras
from stable_cascade.engine.control import ControlImages, ControlRef
from stable_cascade.engine.events import BatchSkipped, Event, Finished, ImageDone, Loading
from stable_cascade.engine.hashing import FileHasher
from stable_cascade.engine.inputs import checked_inputs
from stable_cascade.engine.job import Job, Row
from stable_cascade.engine.loras import hashed
from stable_cascade.engine.models import (
    LoadedModels,
    Offload,
    load_models,
    place,
    resolve_device,
    resolve_dtype,
)
from stable_cascade.engine.running import Calls, prior_steps
from stable_cascade.engine.texts import TextCache
from stable_cascade.engine.threads import configure_cpu_threads
from stable_cascade.fields import DTYPES
from stable_cascade.fields.checks import DEFAULT_SIZE
from stable_cascade.fields.infotext import model_label
from stable_cascade.loading.controlnets import controlnet_spec, load_controlnet
from stable_cascade.loading.native import native_size
from stable_cascade.loading.sources import ModelSources
from stable_cascade.nn.controlnet import ControlNet

logger = logging.getLogger(__name__)
_DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_OFFLOADS: tuple[str, ...] = get_args(Offload)
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
        self.texts = TextCache()
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
        skip: threading.Event | None = None,
    ) -> Iterator[Event]:
        """The events of ``job`` (see :mod:`~stable_cascade.engine.events`); checked before any work.
        ``cancel`` stops the job between steps; ``skip`` drops the batch being made (AUTOMATIC1111's
        "skip": the job goes on with its next batch) and is cleared."""
        image, controls = checked_inputs(job, image)
        stop, taken = threading.Event(), threading.Semaphore(0)
        events: queue.Queue[object] = queue.Queue()

        def emit(event: Event) -> None:
            """Hand ``event`` over and wait until it is taken (so a cancel acts on the next step)."""
            events.put(event)
            while not taken.acquire(timeout=0.05) and not stop.is_set():
                pass

        def work() -> None:
            try:
                self._job(job, image, controls, previews, (stop, skip or threading.Event()), emit)
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
        events: tuple[threading.Event, threading.Event],
        emit: Callable[[Event], None],
    ) -> None:
        start = time.perf_counter()
        calls, controlnet, loaded = self._calls(job, controls, previews, emit)
        load_seconds = time.perf_counter() - start if loaded else 0.0
        _warn_size(job)
        calls.image, (calls.stop, calls.skip), calls.previews = image, events, previews
        calls.control = controls[0][1] if controls else None
        calls.total_steps = (prior_steps(job) + job.decoder_steps) * job.count
        with (
            attached_loras(calls.models, job.loras),
            attached_controlnet(calls.models.prior_pipe, controlnet),
        ):
            for batch in range(job.count):
                first = batch * job.batch_size
                rows = [Row(job, first + i) for i in range(job.batch_size)]
                try:
                    calls.check_stop()
                    made = calls.make(rows, batch, job.count)
                except BatchSkipped:
                    continue
                for done in made:
                    emit(done)
        emit(Finished(calls.seconds["prior"], calls.seconds["decoder"], load_seconds))

    def generate(self, rows: Sequence[Row]) -> list[ImageDone]:
        """The images of ``rows`` of text-to-image jobs that share all their settings but prompts and
        seeds, made by one model call per stage (a batch run's unit); no events, no thread."""
        job = rows[0].job
        for row in rows:
            row.job.validate()
        if job.task != "txt2img" or job.controls:
            raise ValueError(
                "rows of one call are text-to-image without a ControlNet; run other jobs one by one"
            )
        calls, _, _ = self._calls(job, [], False, None)
        with attached_loras(calls.models, job.loras):
            return calls.make(rows)

    def _calls(
        self,
        job: Job,
        controls: list[tuple[ControlRef, ControlImages]],
        previews: bool,
        emit: Callable[[Event], None] | None,
    ) -> tuple[Calls, tuple[ControlNet, Path] | None, bool]:
        """The models of ``job`` (loaded if need be) and what its calls share; its ControlNet; whether
        anything loaded."""
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
            assert emit is not None, "jobs with a ControlNet run with events"
            controlnet, controlnet_loaded = self._controlnet(controls[0][0], job, emit)
            loaded = loaded or controlnet_loaded
        hashes = self.model_sha256(models, controlnet[1] if controlnet is not None else None)
        calls = Calls(models, self.texts, self._record_jobs(), hashes)
        if emit is not None:
            calls.emit = emit
        return calls, controlnet, loaded

    def _record_jobs(self) -> Callable[[Job], Job]:
        """:meth:`record_job`, once per job of a call."""
        recorded: dict[int, tuple[Job, Job]] = {}

        def record(job: Job) -> Job:
            if id(job) not in recorded:
                recorded[id(job)] = (job, self.record_job(job))
            return recorded[id(job)][1]

        return record

    def record_job(self, job: Job) -> Job:
        """The job as its images record it: the dtype it runs in named, the LoRA files' sha256."""
        return dataclasses.replace(
            job,
            dtype=_DTYPE_NAMES.get(self.torch_dtype(job.dtype), job.dtype),
            loras=hashed(job.loras, self.hasher),
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
            emit(Loading(model_label(dataclasses.asdict(sources))))
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


def _warn_size(job: Job) -> None:
    """A warning when the job's bundle was trained at another size (the demo: 128²)."""
    native = native_size(job.models)
    if native is not None and native != DEFAULT_SIZE and (job.width, job.height) != (native, native):
        logger.warning(
            "the %s model was trained at %dx%d; at %dx%d its images are poorer",
            job.model,
            native,
            native,
            job.width,
            job.height,
        )
