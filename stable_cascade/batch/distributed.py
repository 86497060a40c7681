"""The processes of a batch run: one by default, or those ``torchrun`` / ``accelerate launch`` started.

Under a launcher (``WORLD_SIZE`` > 1 in the environment) the process group is initialised (gloo on
CPU; on CUDA nccl for CUDA tensors and gloo for the small messages the run exchanges), and each
process takes ``cuda:LOCAL_RANK`` when it runs on CUDA, and ends when its launcher dies. Every
collective here moves a few Python objects: the run's settings, which units are left, and counts for
the progress bar.
"""

from __future__ import annotations

import ctypes
import datetime
import logging
import os
import signal
import sys
from typing import Any

import torch
import torch.distributed as dist

from stable_cascade.engine.threads import default_threads

logger = logging.getLogger(__name__)
#: How long a process waits for the others at a collective (a slow unit or model download).
TIMEOUT = datetime.timedelta(hours=6)
_PR_SET_PDEATHSIG = 1  # prctl(2)


def end_with_parent() -> None:
    """End this process (SIGTERM) when the launcher that started it dies, however it dies: killing
    ``torchrun`` (even with SIGKILL) stops its workers. Linux only (``PR_SET_PDEATHSIG``); elsewhere,
    kill the launcher's process group."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        failed = libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0
    except (OSError, AttributeError):  # no C library to call
        failed = True
    if failed:
        logger.debug("this process will not end with its launcher")
    elif os.getppid() == 1:  # the launcher died before the call: nobody is left to wait for us
        os.kill(os.getpid(), signal.SIGTERM)


class Processes:
    """This process's place among the run's processes, and the few collectives the run needs."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(self.world)))
        self._started = False
        if self.world > 1:
            end_with_parent()
        if self.world > 1 and not dist.is_initialized():
            backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
            dist.init_process_group(backend=backend, timeout=TIMEOUT)
            self._started = True
            logger.debug("process %d of %d (%s)", self.rank, self.world, backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: str) -> str:
        """This process's device: ``cuda:LOCAL_RANK`` for ``auto`` / ``cuda`` with several processes."""
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def share_cpu(self) -> None:
        """Split the cores among this machine's processes (unless ``OMP_NUM_THREADS`` says otherwise)."""
        if self.local_world > 1 and not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, default_threads() // self.local_world))

    def gather(self, value: Any) -> list[Any]:
        """Every process's ``value``, in rank order (on every process)."""
        if self.world == 1:
            return [value]
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def broadcast(self, value: Any) -> Any:
        """The main process's ``value``, on every process."""
        if self.world == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def agree(self, error: str | None) -> None:
        """Raise a ``ValueError`` on every process when any process found ``error`` (the first one)."""
        errors = [e for e in self.gather(error) if e]
        if errors:
            raise ValueError(errors[0])

    def total(self, count: int) -> int:
        """The sum of ``count`` over the processes."""
        return sum(self.gather(count)) if self.world > 1 else count

    def close(self) -> None:
        if self._started and dist.is_initialized():
            dist.destroy_process_group()
