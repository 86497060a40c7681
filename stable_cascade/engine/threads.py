"""A sane default for torch's CPU threads.

torch starts one intra-op thread per logical core and a pool of inter-op threads. With hyper-threads,
or a second busy process on the machine, those threads oversubscribe the cores and generation gets
many times slower. Unless ``OMP_NUM_THREADS`` says otherwise, use one thread per physical core (at
most the cores this process may run on) and one inter-op thread.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_configured = False


def physical_cores() -> int | None:
    """Physical cores from ``/proc/cpuinfo`` (Linux), else None."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    cores = set()
    physical = core = ""
    for line in [*text.splitlines(), ""]:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key == "physical id":
            physical = value
        elif key == "core id":
            core = value
        elif not key and core:
            cores.add((physical, core))
            physical = core = ""
    return len(cores) or None


def default_threads() -> int:
    """The cores this process may use, capped at the physical cores."""
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    physical = physical_cores()
    return max(1, min(available, physical or available))


def configure_cpu_threads() -> None:
    """Set torch's thread counts once per process (``OMP_NUM_THREADS`` set: leave intra-op alone)."""
    global _configured
    if _configured:
        return
    _configured = True
    if not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(default_threads())
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # inter-op work already started: the count can no longer change
        logger.debug("torch's inter-op thread count was already fixed")
    logger.debug("torch uses %d CPU threads", torch.get_num_threads())
