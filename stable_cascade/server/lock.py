"""One server per data folder: an operating-system lock on ``server.lock``, held while the server runs.

Two servers on one folder would both take the queue's jobs and each would queue again the jobs the
other is running. The lock is the kernel's (``flock``), so a server that dies — even by SIGKILL or
the OOM killer — releases it with its process, and the next start is never blocked by a stale file.
The file also says who holds it (pid, address), for the refusal's message.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

if sys.platform == "win32":
    import msvcrt
else:
    import fcntl

LOCK_FILE = "server.lock"


class FolderInUse(ValueError):
    """Another server holds the data folder's lock."""


class DataLock:
    """The data folder's lock; :meth:`release` (or the process's end) frees it."""

    def __init__(self, folder: Path, host: str, port: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / LOCK_FILE
        self._descriptor: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock(self._descriptor)
        except OSError:
            holder = _holder(self.path)
            self.release()
            raise FolderInUse(
                f"another server ({holder}) is using the data folder {folder}; stop it first, or give "
                "this one another --data"
            ) from None
        about = {"pid": os.getpid(), "host": host, "port": port}
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, json.dumps(about).encode(), 0)

    def release(self) -> None:
        """Free the lock (closing the file frees it); safe to call twice."""
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _lock(descriptor: int) -> None:
    """Take the lock without waiting; ``OSError`` when another process holds it."""
    if sys.platform == "win32":
        msvcrt.locking(descriptor, msvcrt.LK_NBLCK, 1)
    else:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _holder(path: Path) -> str:
    """Who holds the lock, as its file says ("pid 12, http://127.0.0.1:7860/")."""
    try:
        about = json.loads(path.read_text())
        host = str(about["host"])
        return f"pid {int(about['pid'])}, http://{f'[{host}]' if ':' in host else host}:{int(about['port'])}/"
    except (OSError, ValueError, TypeError, KeyError):  # written by a server still starting
        return "starting, pid unknown yet"
