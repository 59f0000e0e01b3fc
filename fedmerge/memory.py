"""Give memory that Python and torch have freed back to the operating system.

A long-lived worker (a Flower simulation actor serving client after client, the ServerApp after MergeRec) frees its
training tensors, but glibc's allocator keeps the freed heap pages mapped: measured on Amazon Beauty, a process
that trained one epoch of ``amazon-seq``'s model held 1.22 GiB RSS afterwards and 0.45 GiB after ``malloc_trim(0)``
(README, "Scaling with domains and catalog size"). Each of the simulation's actors would otherwise keep its largest
training peak for the rest of the run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any


@lru_cache(maxsize=1)
def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``malloc_trim``), else None (macOS, musl, Windows)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") else None


def release_freed_memory() -> bool:
    """Collect garbage, then return the allocator's free heap pages to the OS (glibc ``malloc_trim(0)``).

    Returns whether the C library could be asked (False where it is not glibc: nothing to do there)."""
    gc.collect()
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of process ``pid`` (shared pages split between the processes mapping them), from
    ``/proc/PID/smaps_rollup`` (Linux); OSError when the process is gone or /proc lacks it."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    return next((int(line.split()[1]) * 1024 for line in rollup.splitlines() if line.startswith("Pss:")), 0)
