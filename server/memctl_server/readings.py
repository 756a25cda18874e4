"""A scope's memory readings, as the Dask dashboard shows them.

``MemoryReadings`` stores three numbers (process, managed, unmanaged-old) and
spilled; ``unmanaged_recent`` is derived, so
``managed + unmanaged + unmanaged_recent == process`` holds by construction, as in
Dask's ``MemoryState``.

``UnmanagedHistory`` turns samples of u = process - managed into Dask's
"unmanaged (old)": the minimum of u over the last ``recent-to-old-time``. It takes
times as arguments and reads no clock, so tests drive it directly.

Not covered here: how process memory is measured (``monitor.py``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

#: The wire's uint64 fields hold at most this.
UINT64_MAX = (1 << 64) - 1


def _fit(value: int) -> int:
    return min(max(value, 0), UINT64_MAX)


@dataclass(frozen=True)
class MemoryReadings:
    """A scope's readings, in bytes."""

    process: int
    managed: int
    #: Dask's "unmanaged (old)"; clamped so the three parts sum to process.
    unmanaged_old: int
    spilled: int

    @classmethod
    def of(cls, *, process: int, managed: int, unmanaged_old: int, spilled: int) -> MemoryReadings:
        """Clamp raw samples into a consistent reading.

        ``process`` is at least ``managed`` (the service holds those bytes, whatever
        a racy RSS sample says) and ``unmanaged_old`` lies within ``process - managed``.
        Every number fits the contract's uint64: the service refuses impossible RSS
        reports at the edge, and this makes sure no reading can ever fail to encode.
        """
        managed, spilled = _fit(managed), _fit(spilled)
        process = max(_fit(process), managed)
        unmanaged_old = min(max(unmanaged_old, 0), process - managed)
        return cls(process, managed, unmanaged_old, spilled)

    @property
    def unmanaged(self) -> int:
        """Unmanaged memory that is older than recent-to-old-time (Dask's "unmanaged")."""
        return self.unmanaged_old

    @property
    def unmanaged_recent(self) -> int:
        return self.process - self.managed - self.unmanaged_old


class UnmanagedHistory:
    """Minimum of recent samples of unmanaged memory, over a sliding window.

    A monotonic deque keeps the candidates for the minimum, so adding a sample and
    reading the minimum are O(1) amortised however short the monitor interval. Only
    the monitor (on the event loop) adds samples and touches the deque; each ``add``
    publishes the window's minimum as one int, which readers on other threads
    (Status, the metrics exporters) combine with their own current sample.
    """

    def __init__(self, window: float):
        self.window = window
        self._candidates: deque[tuple[float, int]] = deque()
        #: The minimum over the window as of the last sample; None before the first.
        self.minimum: int | None = None

    def add(self, now: float, unmanaged: int) -> None:
        while self._candidates and self._candidates[-1][1] >= unmanaged:
            self._candidates.pop()
        self._candidates.append((now, unmanaged))
        while self._candidates[0][0] < now - self.window:
            self._candidates.popleft()
        self.minimum = self._candidates[0][1]

    def old(self, current: int) -> int:
        """Unmanaged-old given ``current``, the latest unrecorded u; reads only ``minimum``."""
        minimum = self.minimum
        return current if minimum is None else min(minimum, current)
