"""How much memory this host has, and what a ``memory-limit`` setting means in bytes.

``total_memory_with_source`` is Dask's ``distributed.system.memory_limit()``: the
smallest of the host's RAM, the cgroup v1/v2 limits and RLIMIT_RSS, so a service in
a container sizes itself by the container, not the node. ``resolve_memory_limit``
turns the forms PRODUCT.md allows (auto, a size, a fraction, none) into bytes, as
Dask's ``parse_memory_limit`` does.

Not covered here: the thresholds (fractions of the limit) and how process memory
is measured.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from pathlib import Path

import psutil

from memctl.sizes import format_bytes, parse_bytes

logger = logging.getLogger(__name__)

#: cgroup files that may cap this process's memory, in the order Dask reads them.
CGROUP_FILES = (
    "memory/memory.limit_in_bytes",  # v1 hard limit
    "memory/memory.soft_limit_in_bytes",  # v1 soft limit
    "memory.max",  # v2 hard limit
    "memory.high",  # v2 throttling limit
    "memory.low",  # v2 guaranteed minimum
)

#: What ``memory-limit`` accepts, for error messages here and in the configuration.
MEMORY_LIMIT_FORMS = (
    'use auto, a size like "4 GiB", a fraction of the host\'s memory like 0.5, or none'
)
_NO_LIMIT = ("none", "false")


def total_memory_with_source(cgroup_root: Path = Path("/sys/fs/cgroup")) -> tuple[int, str]:
    """Bytes of memory this process may use, and what set that number.

    The source is ``"RAM"``, the path of the cgroup file, or ``"RLIMIT_RSS"``, so
    a log line can say why the number is smaller than the machine's RAM.
    """
    limit, source = psutil.virtual_memory().total, "RAM"
    if sys.platform == "linux":
        for name in CGROUP_FILES:
            path = cgroup_root / name
            try:
                # "max" (v2 "no limit") fails int() and is skipped like a missing file.
                value = int(path.read_text())
            except (OSError, ValueError):
                continue
            if 0 < value < limit:
                limit, source = value, str(path)
    if sys.platform != "win32":
        import resource

        hard = resource.getrlimit(resource.RLIMIT_RSS)[1]
        if 0 < hard < limit:
            limit, source = hard, "RLIMIT_RSS"
    return limit, source


def total_memory(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes of memory this process may use (see ``total_memory_with_source``)."""
    return total_memory_with_source(cgroup_root)[0]


def _not_understood(value: object) -> ValueError:
    return ValueError(f"memory limit {value!r} is not understood; {MEMORY_LIMIT_FORMS}")


def _requested_limit(
    value: str | int | float | None,
    *,
    total_memory: int,
    nthreads: int | None,
    total_nthreads: int | None,
) -> int | None:
    """The limit ``value`` asks for in bytes, before clamping, or None for no limit."""
    if value is None or value is False:
        return None
    if value is True:
        raise _not_understood(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _NO_LIMIT:
            return None
        if text == "auto":
            if nthreads is None:
                # The service's own scope serves the whole host.
                return total_memory
            cpus = total_nthreads if total_nthreads is not None else os.cpu_count() or 1
            if nthreads <= 0 or cpus <= 0:
                raise ValueError(
                    f"memory limit auto needs a positive number of threads, "
                    f"not nthreads={nthreads} of total_nthreads={cpus}"
                )
            return int(total_memory * min(1.0, nthreads / cpus))
        try:
            number = float(text)
        except ValueError:
            # Not a bare number: a size with a unit, like "4 GiB".
            try:
                return parse_bytes(text) or None
            except ValueError:
                raise _not_understood(value) from None
    else:
        number = float(value)
    if not math.isfinite(number) or number < 0:
        raise _not_understood(value)
    if number <= 1:
        # A fraction of total memory; 0 is "no limit" and 1 is all of it.
        return int(number * total_memory) or None
    if not number.is_integer():
        # Dask reads 1.5 as one byte; that is never what was meant (150%? 1.5 GB?).
        raise _not_understood(value)
    return int(number)


def resolve_memory_limit(
    value: str | int | float | None,
    *,
    total_memory: int,
    nthreads: int | None = None,
    total_nthreads: int | None = None,
) -> int | None:
    """Bytes that ``value`` allows, or None for no limit.

    ``auto`` is ``total_memory * min(1, nthreads / total_nthreads)`` for a worker, and
    all of ``total_memory`` for the service's own scope (``nthreads=None``). A limit
    above ``total_memory`` is clamped to it, with a warning.
    """
    limit = _requested_limit(
        value, total_memory=total_memory, nthreads=nthreads, total_nthreads=total_nthreads
    )
    if limit is not None and limit > total_memory:
        logger.warning(
            "memory limit %s is more than this host's total memory of %s; using %s",
            format_bytes(limit),
            format_bytes(total_memory),
            format_bytes(total_memory),
        )
        return total_memory
    return limit


def check_memory_limit(value: str | int | float | None) -> None:
    """Raise ``ValueError`` unless ``value`` is a form of memory limit.

    For loading the configuration, before the worker's share of memory is known;
    it never warns, because nothing is clamped.
    """
    _requested_limit(value, total_memory=1, nthreads=None, total_nthreads=None)
