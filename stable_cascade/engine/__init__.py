"""The engine: jobs (the one shape of a run's settings), their records, and the engine that runs them
on cached models. Every front end (command line, server, batch generation) builds a :class:`Job`,
runs it with :meth:`Engine.run` and saves what :class:`ImageDone` events carry with :func:`save_png`."""

from stable_cascade.engine.control import ControlRef
from stable_cascade.engine.engine import Engine, attached_loras, check_inputs
from stable_cascade.engine.events import (
    Event,
    Finished,
    ImageDone,
    JobCancelled,
    Loading,
    Preview,
    Progress,
)
from stable_cascade.engine.hashing import FileHasher, image_sha256, sha256_file
from stable_cascade.engine.images import open_image
from stable_cascade.engine.job import DTYPES, TASKS, Job, LoraRef, StageJob, Task, native_size
from stable_cascade.engine.record import ImageRecord, read_png, save_png
from stable_cascade.engine.threads import configure_cpu_threads
from stable_cascade.loading.sources import ModelSources

__all__ = [
    "DTYPES",
    "TASKS",
    "ControlRef",
    "Engine",
    "Event",
    "FileHasher",
    "Finished",
    "ImageDone",
    "ImageRecord",
    "Job",
    "JobCancelled",
    "Loading",
    "LoraRef",
    "ModelSources",
    "Preview",
    "Progress",
    "StageJob",
    "Task",
    "attached_loras",
    "check_inputs",
    "configure_cpu_threads",
    "image_sha256",
    "native_size",
    "open_image",
    "read_png",
    "save_png",
    "sha256_file",
]
