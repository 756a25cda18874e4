"""What client calls return: plain dataclasses decoded from the wire messages.

Shared by ``Client`` and ``AsyncClient``. ``Status.to_dict()`` is the JSON that
``memctl status --json`` prints (snake_case keys).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from .v1 import memctl_pb2 as pb

Location = Literal["memory", "disk", "unknown"]


def location_name(value: int) -> Location:
    if value == pb.LOCATION_MEMORY:
        return "memory"
    if value == pb.LOCATION_DISK:
        return "disk"
    return "unknown"


def enum_name(enum: Any, value: int, prefix: str) -> str:
    """``SCOPE_STATE_PAUSED`` -> ``paused``; ``unknown(N)`` for a value newer than us."""
    try:
        return str(enum.Name(value)).removeprefix(prefix).lower()
    except ValueError:
        return f"unknown({value})"


def thresholds_dict(t: pb.Thresholds) -> dict[str, float | Literal[False]]:
    """Thresholds as the configuration spells them: a fraction, or False for off."""
    return {
        name: getattr(t, name) if t.HasField(name) else False
        for name in ("target", "spill", "pause", "terminate")
    }


def readings_dict(r: pb.MemoryReadings) -> dict[str, int]:
    return {
        "process": r.process,
        "managed": r.managed,
        "unmanaged": r.unmanaged,
        "unmanaged_recent": r.unmanaged_recent,
        "spilled": r.spilled,
    }


@dataclass(frozen=True)
class PutResult:
    key: str
    size: int
    location: Location


@dataclass(frozen=True)
class StoredValue:
    """A value with its metadata, and where it was when read."""

    data: bytes
    metadata: bytes
    location: Location


@dataclass(frozen=True)
class KeyInfo:
    key: str
    size: int
    location: Location
    metadata_size: int

    @classmethod
    def from_pb(cls, info: pb.KeyInfo) -> KeyInfo:
        return cls(info.key, info.size, location_name(info.location), info.metadata_size)


@dataclass(frozen=True)
class EvictResult:
    bytes_moved: int
    values_moved: int
    #: Non-empty when a spill failed; what did not move stays in RAM.
    error: str = ""


@dataclass(frozen=True)
class TrimResult:
    supported: bool
    detail: str
    rss_before: int
    rss_after: int
    workers_asked: int = 0


@dataclass(frozen=True)
class ScopeStatus:
    """One scope's readings, in bytes. ``managed + unmanaged + unmanaged_recent == process``."""

    name: str
    kind: str
    state: str
    spilling: bool
    process: int
    managed: int
    unmanaged: int
    unmanaged_recent: int
    spilled: int
    #: Bytes; None for no limit.
    memory_limit: int | None
    #: Fractions of the limit; False for a threshold turned off.
    thresholds: dict[str, float | Literal[False]]
    keys_in_memory: int
    keys_on_disk: int
    pid: int = 0

    @classmethod
    def from_pb(cls, scope: pb.ScopeStatus) -> ScopeStatus:
        r = scope.readings
        return cls(
            name=scope.name,
            kind=enum_name(pb.ScopeKind, scope.kind, "SCOPE_KIND_"),
            state=enum_name(pb.ScopeState, scope.state, "SCOPE_STATE_"),
            spilling=scope.spilling,
            process=r.process,
            managed=r.managed,
            unmanaged=r.unmanaged,
            unmanaged_recent=r.unmanaged_recent,
            spilled=r.spilled,
            memory_limit=scope.memory_limit or None,
            thresholds=thresholds_dict(scope.thresholds),
            keys_in_memory=scope.keys_in_memory,
            keys_on_disk=scope.keys_on_disk,
            pid=scope.pid,
        )


@dataclass(frozen=True)
class Status:
    """The service and its scopes, the service scope first."""

    version: str
    pid: int
    uptime_seconds: float
    total_memory: int
    spill_directory: str
    max_spill: int | None
    spill_compression: str
    monitor_interval_seconds: float
    scopes: list[ScopeStatus] = field(default_factory=list)

    @classmethod
    def from_pb(cls, status: pb.StatusResponse) -> Status:
        s = status.service
        return cls(
            version=s.version,
            pid=s.pid,
            uptime_seconds=s.uptime_seconds,
            total_memory=s.total_memory,
            spill_directory=s.spill_directory,
            max_spill=s.max_spill or None,
            spill_compression=s.spill_compression,
            monitor_interval_seconds=s.monitor_interval_seconds,
            scopes=[ScopeStatus.from_pb(scope) for scope in status.scopes],
        )

    @property
    def service(self) -> ScopeStatus:
        """The service's own scope."""
        return self.scopes[0]

    def to_dict(self) -> dict[str, Any]:
        """One JSON object: the service scope's readings at the top level, then
        ``service`` (the daemon) and ``scopes`` (every scope)."""
        top = asdict(self.service)
        return {
            **{
                k: top[k]
                for k in (
                    "process",
                    "managed",
                    "unmanaged",
                    "unmanaged_recent",
                    "spilled",
                    "memory_limit",
                    "state",
                    "spilling",
                    "keys_in_memory",
                    "keys_on_disk",
                    "thresholds",
                )
            },
            "service": {k: v for k, v in asdict(self).items() if k != "scopes"},
            "scopes": [asdict(scope) for scope in self.scopes],
        }


@dataclass(frozen=True)
class EventRecord:
    """One event of the service's log: a spill burst, pause, resume, terminate,
    restart or trim, with its reason and the readings at the time."""

    id: int
    time: float
    kind: str
    scope: str
    reason: str
    #: process, managed, unmanaged, unmanaged_recent, spilled; None if not measured.
    readings: dict[str, int] | None
    details: dict[str, str]

    @classmethod
    def from_pb(cls, event: pb.Event) -> EventRecord:
        return cls(
            id=event.id,
            time=event.time,
            kind=enum_name(pb.EventKind, event.kind, "EVENT_KIND_"),
            scope=event.scope,
            reason=event.reason,
            readings=readings_dict(event.readings) if event.HasField("readings") else None,
            details=dict(event.details),
        )
