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

from .protocol import CHUNK_SIZE
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


#: glibc's mallopt parameter numbers (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Buffers at least this large get their own mapping, returned to the OS on free:
#: values, but not the buffers a chunk message passes through (a chunk and its
#: framing, copied by gRPC), which the heap reuses message after message.
MMAP_THRESHOLD = 2 * CHUNK_SIZE
#: Free memory kept at the top of the heap: enough for the buffers of the next few
#: messages, which would otherwise be returned to the OS and faulted in again.
TRIM_THRESHOLD = 8 * CHUNK_SIZE


def pin_mmap_threshold() -> bool:
    """Fix glibc's mmap and trim thresholds so freed value buffers go back to the OS
    at once, and message buffers do not.

    Values travel as chunks and are assembled into large buffers. glibc raises its
    mmap threshold dynamically (up to 32 MiB) after the first such buffer is freed,
    after which freed buffers stay in the heap and RSS drifts away from managed
    memory; setting the thresholds explicitly turns that off. Below the mmap
    threshold the heap keeps a few messages' worth of free memory: trimmed after
    every message, each chunk's buffers were fresh pages, and faulting them in took
    as long as the rest of a large Get (256 MiB: 260 MiB/s with them, 510 without).
    Returns whether both were set.
    """
    if other_allocator() is not None or _malloc_trim() is None:
        return False
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    trim_set = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and trim_set)


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
