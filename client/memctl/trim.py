"""Give free heap memory back to the OS with glibc's ``malloc_trim(0)``.

Only where glibc's malloc is the allocator: with jemalloc, tcmalloc or mimalloc
preloaded, calling malloc_trim could misbehave (Dask's docs warn of segfaults), so
``trim()`` says why it did nothing instead. Used by the service on itself; a worker
does the same on a TRIM command.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import psutil

from .results import TrimResult

#: Shared objects that replace malloc when preloaded.
_OTHER_ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc", "hoard", "snmalloc")


def other_allocator(maps: Path = Path("/proc/self/maps")) -> str | None:
    """Name of a non-glibc allocator mapped into this process, if any."""
    try:
        text = maps.read_text()
    except OSError:
        text = os.environ.get("LD_PRELOAD", "")
    for name in _OTHER_ALLOCATORS:
        if f"lib{name}" in text:
            return name
    return None


def _malloc_trim() -> ctypes._CFuncPtr | None:  # type: ignore[name-defined]
    if not os.confstr_names.get("CS_GNU_LIBC_VERSION") or not _glibc_version():
        return None
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _glibc_version() -> str | None:
    try:
        return os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        return None


#: glibc's mallopt parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3
#: Buffers at least this large get their own mapping, returned to the OS on free.
MMAP_THRESHOLD = 256 * 1024


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold so freed value buffers go back to the OS at once.

    Values travel as 1 MiB chunks and are assembled into large buffers. glibc raises
    its mmap threshold dynamically (up to 32 MiB) after the first such buffer is
    freed, after which freed buffers stay in the heap and RSS drifts away from
    managed memory. Setting it explicitly turns that off. Returns whether it was set.
    """
    if other_allocator() is not None or _malloc_trim() is None:
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))


def trim(maps: Path = Path("/proc/self/maps")) -> TrimResult:
    """Call ``malloc_trim(0)`` if it is safe here; RSS before and after either way."""
    process = psutil.Process()
    before = process.memory_info().rss
    allocator = other_allocator(maps)
    if allocator is not None:
        return TrimResult(
            False,
            f"malloc_trim not called: {allocator} is the allocator, not glibc's malloc "
            f"({allocator} returns memory to the OS by itself; tune it instead)",
            before,
            before,
        )
    malloc_trim = _malloc_trim()
    if malloc_trim is None:
        return TrimResult(
            False, "malloc_trim not called: this C library is not glibc", before, before
        )
    released = malloc_trim(0)
    after = process.memory_info().rss
    outcome = "released memory" if released else "had nothing to release"
    return TrimResult(True, f"malloc_trim(0) {outcome} ({_glibc_version()})", before, after)
