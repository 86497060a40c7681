"""The memory a server reports (AUTOMATIC1111's ``GET /sdapi/v1/memory`` shape): the machine's RAM and
this process's share, and CUDA's (its free and total memory and torch's allocator statistics)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def memory_report() -> dict[str, Any]:
    """``{"ram": {"free", "used", "total"}, "cuda": {...} or {"error": why}}`` in bytes."""
    return {"ram": _ram(), "cuda": _cuda()}


def _ram() -> dict[str, Any]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total, free = page * os.sysconf("SC_PHYS_PAGES"), page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        return {"error": "the system's memory cannot be read here"}
    statm = Path("/proc/self/statm")
    used = int(statm.read_text().split()[1]) * page if statm.is_file() else total - free
    return {"free": free, "used": used, "total": total}


def _cuda() -> dict[str, Any]:
    if not torch.cuda.is_available():
        return {"error": "CUDA is not available"}
    free, total = torch.cuda.mem_get_info()
    stats = torch.cuda.memory_stats()

    def pair(name: str) -> dict[str, int]:
        return {
            "current": int(stats.get(f"{name}.all.current", 0)),
            "peak": int(stats.get(f"{name}.all.peak", 0)),
        }

    return {
        "system": {"free": free, "used": total - free, "total": total},
        "active": pair("active_bytes"),
        "allocated": pair("allocated_bytes"),
        "reserved": pair("reserved_bytes"),
        "inactive": pair("inactive_split_bytes"),
        "events": {"retries": int(stats.get("num_alloc_retries", 0)), "oom": int(stats.get("num_ooms", 0))},
    }
