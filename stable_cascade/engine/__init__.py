"""The engine: jobs (one attribute per row of the field table), their records, and the engine that runs
them on cached models. Every front end (command line, server, batch generation) builds a :class:`Job`,
runs it with :meth:`Engine.run` (a batch run's units: :meth:`Engine.generate`) and saves what
:class:`ImageDone` events carry with :func:`save_png`. Front ends import this package and
:mod:`stable_cascade.fields` only: what they need below (the named bundles, the presets, atomic file
writes, the guarded image opener) is re-exported here."""

from stable_cascade.checkpoint import atomic
from stable_cascade.conditioning.image_files import open_image_bytes
from stable_cascade.diffusion.presets import COMBINED_PRESETS
from stable_cascade.engine.attach import attached_loras
from stable_cascade.engine.control import ControlRef
from stable_cascade.engine.engine import Engine
from stable_cascade.engine.events import (
    BatchSkipped,
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
from stable_cascade.engine.inputs import check_inputs
from stable_cascade.engine.job import Job, Row
from stable_cascade.engine.legacy import UNKNOWN_IMAGE
from stable_cascade.engine.library import Checkpoint, ModelLibrary, available
from stable_cascade.engine.loras import LoraRef
from stable_cascade.engine.memory import memory_report
from stable_cascade.engine.record import (
    INFOTEXT_KEY,
    ImageRecord,
    encode_png,
    package_version,
    read_png,
    record_of,
    save_png,
)
from stable_cascade.engine.threads import configure_cpu_threads, default_threads
from stable_cascade.engine.tokens import prompt_tokens
from stable_cascade.loading.bundles import (
    BUNDLES,
    DEFAULT_BUNDLE,
    OFFLINE_HINT,
    RELEASED_CONTROLNETS,
    ModelBundle,
    get_bundle,
)
from stable_cascade.loading.native import native_size
from stable_cascade.loading.sources import ModelSources

__all__ = [
    "BUNDLES",
    "COMBINED_PRESETS",
    "DEFAULT_BUNDLE",
    "INFOTEXT_KEY",
    "OFFLINE_HINT",
    "RELEASED_CONTROLNETS",
    "UNKNOWN_IMAGE",
    "BatchSkipped",
    "Checkpoint",
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
    "ModelBundle",
    "ModelLibrary",
    "ModelSources",
    "Preview",
    "Progress",
    "Row",
    "atomic",
    "attached_loras",
    "available",
    "check_inputs",
    "configure_cpu_threads",
    "default_threads",
    "encode_png",
    "get_bundle",
    "image_sha256",
    "memory_report",
    "native_size",
    "open_image",
    "open_image_bytes",
    "package_version",
    "prompt_tokens",
    "read_png",
    "record_of",
    "save_png",
    "sha256_file",
]
