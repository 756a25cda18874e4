"""The event log: every spill, pause, resume, terminate, restart, trim and data loss.

Each event is logged as one structured line (logger ``memctl.events``; JSON when
``log.format: json``) with its scope, reason and readings, and the last
``CAPACITY`` are kept for the ``Events`` RPC (``memctl events``). Counts per kind
feed the metrics, so there is one bookkeeping, not two. The event loop records; the
metrics exporters read the counts on threads of their own, so each ``record``
publishes them as new read-only mappings instead of changing them in place.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal, TypeVar

from .errors import InvalidArgument
from .readings import MemoryReadings

logger = logging.getLogger("memctl.events")
K = TypeVar("K")

EventKind = Literal["spill", "pause", "resume", "terminate", "restart", "trim", "data_loss"]
EVENT_KINDS: tuple[EventKind, ...] = (
    "spill",
    "pause",
    "resume",
    "terminate",
    "restart",
    "trim",
    "data_loss",
)
#: How many recent events are kept for the Events RPC.
CAPACITY = 500


@dataclass(frozen=True)
class Event:
    id: int
    time: float
    kind: EventKind
    scope: str
    reason: str
    readings: MemoryReadings | None = None
    details: dict[str, str] = field(default_factory=dict)

    def fields(self) -> dict[str, object]:
        """The event as flat, loggable fields."""
        flat: dict[str, object] = {"event": self.kind, "scope": self.scope, "reason": self.reason}
        if self.readings is not None:
            r = self.readings
            flat.update(
                process=r.process,
                managed=r.managed,
                unmanaged=r.unmanaged,
                unmanaged_recent=r.unmanaged_recent,
                spilled=r.spilled,
            )
        flat.update(self.details)
        return flat


class EventLog:
    def __init__(self, capacity: int = CAPACITY):
        self.capacity = capacity
        self.recent: deque[Event] = deque(maxlen=capacity)
        #: Events so far, by kind and scope; bytes given back by trims, by scope.
        #: Replaced whole by each ``record``: safe to iterate from any thread.
        self.counts: Mapping[tuple[EventKind, str], int] = MappingProxyType({})
        self.trimmed_bytes: Mapping[str, int] = MappingProxyType({})
        self._ids = itertools.count(1)

    def record(
        self,
        kind: EventKind,
        scope: str,
        reason: str,
        readings: MemoryReadings | None = None,
        **details: object,
    ) -> Event:
        event = Event(
            next(self._ids),
            time.time(),
            kind,
            scope,
            reason,
            readings,
            {k: str(v) for k, v in details.items()},
        )
        self.recent.append(event)
        self.counts = _plus(self.counts, (kind, scope), 1)
        if kind == "trim":
            before, after = details.get("rss_before", 0), details.get("rss_after", 0)
            assert isinstance(before, int) and isinstance(after, int)
            self.trimmed_bytes = _plus(self.trimmed_bytes, scope, max(before - after, 0))
        level = logging.WARNING if kind in ("pause", "terminate") else logging.INFO
        level = logging.ERROR if kind == "data_loss" else level
        # Text logs read "pause scope='w': reason"; JSON logs get every field.
        logger.log(level, "%s scope=%r: %s", kind, scope, reason, extra={"fields": event.fields()})
        return event

    def select(self, *, limit: int = 0, scope: str = "", after_id: int = 0) -> list[Event]:
        """Recent events, oldest first, filtered as the Events RPC asks."""
        if limit > self.capacity:
            raise InvalidArgument(
                f"limit is {limit}; the service keeps the last {self.capacity} events, so "
                f"ask for at most {self.capacity} (0 means all of them)"
            )
        events = [e for e in self.recent if e.id > after_id and (not scope or e.scope == scope)]
        return events[-limit:] if limit else events


def _plus(counts: Mapping[K, int], key: K, n: int) -> Mapping[K, int]:
    """A new read-only copy of ``counts`` with ``n`` added under ``key``."""
    return MappingProxyType({**counts, key: counts.get(key, 0) + n})
