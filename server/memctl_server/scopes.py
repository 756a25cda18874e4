"""Scopes: every stored byte belongs to one, each with its own limit and spill store.

The service's own scope holds data put by clients that are not attached; each
attached worker has a scope of its own (see PRODUCT.md, "Scopes"). A scope owns a
``SpillBuffer`` (its values and their LRU order), the values' metadata, and the
history behind its "unmanaged" reading.

Methods here are synchronous and may touch the disk: the service calls them from
its one store thread, never from the event loop. Not covered here: the gRPC
mapping (``service.py``) and measuring process memory (``monitor.py``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, ParamSpec, Protocol, TypeVar

from memctl.sizes import format_bytes

from .engine import ScopeMemo, Thresholds
from .errors import NotFound, ResourceExhausted
from .readings import MemoryReadings, UnmanagedHistory
from .store import SpillCounters, SpillFailed, Value

P = ParamSpec("P")
R = TypeVar("R")


class ScopeStore(Protocol):
    """What a scope needs of its store: ``SpillBuffer``, or ``ForeignStore`` around a
    user-supplied mapping."""

    target: float
    can_spill: bool

    def __setitem__(self, key: str, value: Value) -> None: ...
    def __getitem__(self, key: str) -> Value: ...
    def __delitem__(self, key: str) -> None: ...
    def location(self, key: str) -> Literal["memory", "disk"] | None: ...
    @property
    def managed(self) -> int: ...
    @property
    def spilled(self) -> int: ...
    @property
    def keys_in_memory(self) -> int: ...
    @property
    def keys_on_disk(self) -> int: ...
    @property
    def counters(self) -> SpillCounters: ...
    def disk_room(self) -> float: ...
    def describe_disk(self) -> str: ...
    def evict_bytes(self, wanted: float, moved: list[int]) -> None: ...
    def evict_keys(self, keys: Iterable[str], moved: list[int]) -> None: ...


def target_bytes(memory_limit: int | None, thresholds: Thresholds) -> float:
    """Managed bytes above which LRU values spill; ``inf`` when the rule is off."""
    if memory_limit is None or thresholds.target is False:
        return math.inf
    return memory_limit * thresholds.target


@dataclass(frozen=True)
class StoreSizes:
    """A consistent view of a scope's store, published after every store operation."""

    managed: int = 0
    spilled: int = 0
    keys_in_memory: int = 0
    keys_on_disk: int = 0
    counters: SpillCounters = field(default_factory=SpillCounters)


def publishes(method: Callable[P, R]) -> Callable[P, R]:
    """Run a store-thread method, then publish the store's sizes.

    Readers on other threads (the monitor, Status, metrics) see the sizes between
    operations, never halfway through one: a value being inserted and not yet
    spilled would otherwise look like a crossed target.
    """

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        scope = args[0]
        assert isinstance(scope, Scope)
        try:
            return method(*args, **kwargs)
        finally:
            data = scope.data
            scope.sizes = StoreSizes(
                data.managed,
                data.spilled,
                data.keys_in_memory,
                data.keys_on_disk,
                data.counters,
            )

    return wrapper


class ScopeKind(Enum):
    SERVICE = "service"
    WORKER = "worker"


class ScopeState(Enum):
    RUNNING = "running"
    PAUSED = "paused"
    TERMINATING = "terminating"
    DETACHED = "detached"


@dataclass(frozen=True)
class ScopeView:
    """A scope's control state as readers on other threads see it: published whole by
    the event loop, so state, spilling and pid always belong to one moment."""

    state: ScopeState
    spilling: bool
    pid: int


@dataclass(frozen=True)
class Entry:
    """What the scope knows of a value besides its bytes."""

    size: int
    metadata: bytes


@dataclass(frozen=True)
class KeyInfo:
    key: str
    size: int
    location: Literal["memory", "disk"]
    metadata_size: int


@dataclass(frozen=True)
class EvictResult:
    bytes_moved: int
    values_moved: int
    error: str = ""


class Scope:
    """One scope's data and settings.

    One owner per field: the store thread alone touches ``data`` and ``entries`` and
    publishes ``sizes``; the event loop alone sets the control fields (``attached``,
    ``pid``, ``memo``, ...) and the unmanaged history. Readers on other threads
    (Status, metrics exporters) read only immutable values published whole:
    ``sizes``, ``view`` (behind ``state``, ``spilling``), ``memory_limit``,
    ``reported_rss`` and the history's ``minimum``.
    """

    def __init__(
        self,
        name: str,
        *,
        kind: ScopeKind,
        memory_limit: int | None,
        thresholds: Thresholds,
        data: ScopeStore,
        recent_to_old_time: float,
    ):
        self.name = name
        self.kind = kind
        self.memory_limit = memory_limit
        self.thresholds = thresholds
        self.data = data
        self.entries: dict[str, Entry] = {}
        self.sizes = StoreSizes()
        self.unmanaged_history = UnmanagedHistory(recent_to_old_time)
        # Worker scopes only: what the control plane knows of the worker.
        self._attached = kind is ScopeKind.SERVICE
        self._pid = 0
        #: The engine's memory of this scope (spilling, paused, terminating).
        self._memo = ScopeMemo()
        self.view = self._view()
        self.detached_since: float | None = None
        self.reported_rss: int | None = None
        self.supervised = False

    def _view(self) -> ScopeView:
        if not self._attached:
            state = ScopeState.DETACHED
        elif self._memo.terminating:
            state = ScopeState.TERMINATING
        elif self._memo.paused:
            state = ScopeState.PAUSED
        else:
            state = ScopeState.RUNNING
        return ScopeView(state, self._memo.spilling, self._pid)

    # Setters republish the view: the event loop writes, readers read ``view``.
    @property
    def attached(self) -> bool:
        return self._attached

    @attached.setter
    def attached(self, attached: bool) -> None:
        self._attached = attached
        self.view = self._view()

    @property
    def pid(self) -> int:
        return self._pid

    @pid.setter
    def pid(self, pid: int) -> None:
        self._pid = pid
        self.view = self._view()

    @property
    def memo(self) -> ScopeMemo:
        return self._memo

    @memo.setter
    def memo(self, memo: ScopeMemo) -> None:
        self._memo = memo
        self.view = self._view()

    @property
    def state(self) -> ScopeState:
        return self.view.state

    @property
    def spilling(self) -> bool:
        return self.view.spilling

    @publishes
    def set_memory_limit(self, memory_limit: int | None) -> None:
        """A re-attaching worker may bring another limit; the target moves with it."""
        self.memory_limit = memory_limit
        self.data.target = self.target_bytes

    @property
    def target_bytes(self) -> float:
        """Managed bytes above which LRU values spill; ``inf`` when the rule is off."""
        return target_bytes(self.memory_limit, self.thresholds)

    @property
    def managed(self) -> int:
        return self.sizes.managed

    @property
    def spilled(self) -> int:
        return self.sizes.spilled

    def readings(self, *, process: int, sizes: StoreSizes) -> MemoryReadings:
        """Readings given this scope's process memory and store sizes (not recorded).

        Any thread: reads only the history's published minimum.
        """
        return MemoryReadings.of(
            process=process,
            managed=sizes.managed,
            unmanaged_old=self.unmanaged_history.old(max(process - sizes.managed, 0)),
            spilled=sizes.spilled,
        )

    def record(self, *, process: int, sizes: StoreSizes, now: float) -> MemoryReadings:
        """The monitor's sample (event loop only): remembered for "unmanaged", then read."""
        self.unmanaged_history.add(now, max(process - sizes.managed, 0))
        return self.readings(process=process, sizes=sizes)

    # --- data plane (store thread) ------------------------------------------------
    def admit(self, size: int) -> None:
        """Refuse a Put of ``size`` bytes up front when neither RAM nor disk may take it."""
        ram_room = self.memory_limit - self.managed if self.memory_limit is not None else math.inf
        disk_room = self.data.disk_room()
        if size <= ram_room or size <= disk_room:
            return
        limit = format_bytes(self.memory_limit) if self.memory_limit is not None else "none"
        raise ResourceExhausted(
            f"a value of {format_bytes(size)} fits neither in RAM (scope {self.name!r}: "
            f"memory limit {limit}, {format_bytes(self.managed)} managed) nor on disk "
            f"({self.data.describe_disk()}); "
            "delete values, or raise --memory-limit or memory.max-spill"
        )

    @publishes
    def put(self, key: str, value: Value, metadata: bytes) -> Literal["memory", "disk"]:
        """Store ``value``, replacing any old one; where it went."""
        self.data[key] = value
        self.entries[key] = Entry(memoryview(value).nbytes, metadata)
        location = self.data.location(key)
        assert location is not None
        return location

    @publishes
    def get(self, key: str) -> tuple[Value, bytes, Literal["memory", "disk"]]:
        """The value, its metadata, and where it was before this read."""
        location = self.data.location(key)
        if location is None:
            raise NotFound(f"no value under key {key!r} in scope {self.name!r}")
        return self.data[key], self.entries[key].metadata, location

    def stat(self, key: str) -> KeyInfo:
        location = self.data.location(key)
        if location is None:
            raise NotFound(f"no value under key {key!r} in scope {self.name!r}")
        entry = self.entries[key]
        return KeyInfo(key, entry.size, location, len(entry.metadata))

    def list_keys(self, prefix: str, after: str, limit: int) -> list[KeyInfo]:
        """Up to ``limit`` keys starting with ``prefix``, sorted, strictly after ``after``."""
        keys = sorted(k for k in self.entries if k.startswith(prefix) and k > after)
        return [self.stat(k) for k in keys[:limit]]

    @publishes
    def evict(
        self, *, keys: Sequence[str] = (), nbytes_wanted: int = 0, everything: bool = False
    ) -> EvictResult:
        """Move named values, ``nbytes_wanted`` of LRU values, or all of RAM to disk."""
        missing = [k for k in keys if self.data.location(k) is None]
        if missing:
            raise NotFound(
                f"{len(missing)} of the keys to evict are not in scope {self.name!r}, "
                f"e.g. {missing[0]!r}; nothing was moved"
            )
        moved = [0, 0]
        try:
            if keys:
                self.data.evict_keys(keys, moved)
            else:
                self.data.evict_bytes(math.inf if everything else nbytes_wanted, moved)
        except SpillFailed as exc:
            return EvictResult(moved[0], moved[1], str(exc))
        return EvictResult(moved[0], moved[1])

    @publishes
    def delete(self, keys: Sequence[str]) -> int:
        """Remove values; how many of the named keys existed."""
        deleted = 0
        for key in dict.fromkeys(keys):
            if self.data.location(key) is not None:
                del self.data[key]
                del self.entries[key]
                deleted += 1
        return deleted
