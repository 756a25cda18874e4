"""Scopes: every stored byte belongs to one, each with its own limit and spill store.

The service's own scope holds data put by clients that are not attached; each
attached worker has a scope of its own (see PRODUCT.md, "Scopes"). A scope owns a
``SpillBuffer`` (its values, their metadata and checksums, and their LRU order: the
only per-key state) and the history behind its "unmanaged" reading.

Methods here are synchronous and may touch the disk: the service calls them from
its one store thread, never from the event loop. Not covered here: the gRPC
mapping (``service.py``) and measuring process memory (``monitor.py``).
"""

from __future__ import annotations

import bisect
import functools
import heapq
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal, NamedTuple, ParamSpec, Protocol, TypeVar

from memctl.sizes import format_bytes

from .engine import Lines, ScopeMemo, Thresholds
from .errors import DataLoss, NotFound, ResourceExhausted
from .persist import FoundFile, Journal
from .readings import MemoryReadings, UnmanagedHistory
from .segments import Segment
from .spillfile import SpillFileDamaged, SpillReader, SpillWriter, checksum
from .store import Entry, OnDisk, Record, SpillBuffer, SpillCounters, SpillFailed, Value

P = ParamSpec("P")
R = TypeVar("R")


class ScopeStore(Protocol):
    """What a scope needs of its store: ``SpillBuffer``, or ``ForeignStore`` around a
    user-supplied mapping."""

    target: float
    can_spill: bool
    #: Values too large for RAM can be streamed into and out of spill files.
    can_stream: bool
    #: Reads are checked against the value's checksum by the store itself.
    verifies_reads: bool

    def __setitem__(self, key: str, value: Record) -> None: ...
    def insert(self, key: str, value: Record) -> None: ...
    def insert_many(self, records: Sequence[tuple[str, Record]]) -> list[bool]: ...
    def read_in_ram(self, keys: Sequence[str]) -> list[tuple[int, bytes, int, Value] | None]: ...
    def settle(self) -> None: ...
    def __getitem__(self, key: str) -> Record: ...
    def __delitem__(self, key: str) -> None: ...
    def __iter__(self) -> Iterator[str]: ...
    def entry(self, key: str) -> Entry: ...
    def open_writer(self, key: str, metadata: bytes) -> SpillWriter: ...
    def adopt(self, key: str, writer: SpillWriter) -> None: ...
    def open_reader(self, key: str) -> SpillReader: ...
    def spill_file(self, key: str) -> str | None: ...
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
    def disk_capacity(self) -> float: ...
    def reserve_disk(self, nbytes: int) -> None: ...
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

    @property
    def keys(self) -> int:
        return self.keys_in_memory + self.keys_on_disk


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


Route = Literal["memory", "disk"]


@dataclass
class ValueRead:
    """A value being read: whole (``data``), or in pieces from its spill file (``reader``)."""

    entry: Entry
    location: Literal["memory", "disk"]
    data: Value | None = None
    reader: SpillReader | None = None


class ManyRead(NamedTuple):
    """One item of a GetMany: found with its bytes, found but too large to travel
    inline (``data`` None), missing (``location`` None), or failed. (A tuple: one is
    made per value read, and a frozen dataclass costs three times as much to make.)"""

    key: str
    location: Route | None = None
    size: int = 0
    metadata: bytes = b""
    crc: int = 0
    data: Value | None = None
    failure: DataLoss | None = None


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


class SortedKeys:
    """A scope's keys in order for ListKeys, so that a page costs a bisection and its
    own keys rather than a sort of every key.

    Sorted at the first page, then kept up to date lazily: keys added since wait in a
    list of their own, merged into each page as it is read; removed keys stay, and
    pages skip them. Dropped, to be sorted afresh at the next page, once the keys
    added and removed since outnumber half the sorted ones: that bounds what it holds
    (8 bytes a key, and only once some ListKeys has asked). Store thread only.
    """

    def __init__(self) -> None:
        self._sorted: list[str] | None = None
        self._added: list[str] = []
        self._removed = 0

    def added(self, key: str) -> None:
        if self._sorted is not None:
            self._added.append(key)
            self._changed()

    def removed(self) -> None:
        if self._sorted is not None:
            self._removed += 1
            self._changed()

    def _changed(self) -> None:
        assert self._sorted is not None
        if len(self._added) + self._removed > len(self._sorted) // 2:
            self._sorted, self._added, self._removed = None, [], 0

    def page(
        self,
        keys: Iterable[str],
        present: Callable[[str], bool],
        prefix: str,
        after: str,
        limit: int,
    ) -> list[str]:
        """Up to ``limit`` keys starting with ``prefix``, sorted, strictly after ``after``.

        ``keys`` are all the keys stored, read only to sort afresh; ``present`` tells
        the removed ones the pages skip.
        """
        if self._sorted is None:
            self._sorted = sorted(keys)
        self._added.sort()  # cheap when only the keys added since the last page are new
        page: list[str] = []
        previous = None
        merged = heapq.merge(_from(self._sorted, prefix, after), _from(self._added, prefix, after))
        for key in merged:
            if len(page) == limit or not key.startswith(prefix):
                break
            if key != previous and present(key):  # a key removed and added again is in both
                page.append(key)
            previous = key
        return page


def _from(keys: list[str], prefix: str, after: str) -> Iterator[str]:
    """Sorted ``keys`` from the first that may be on the page: past ``after``, not
    before ``prefix`` (the keys starting with it come first after that)."""
    start = max(bisect.bisect_right(keys, after), bisect.bisect_left(keys, prefix))
    return (keys[i] for i in range(start, len(keys)))


class Scope:
    """One scope's data and settings.

    One owner per field: the store thread alone touches ``data`` and ``sorted_keys`` and
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
        journal: Journal | None = None,
    ):
        self.name = name
        #: With ``persist: true``, records every value stored and removed.
        self.journal = journal
        self.kind = kind
        self.memory_limit = memory_limit
        self.thresholds = thresholds
        self.data = data
        self.sorted_keys = SortedKeys()
        #: Held by whoever acts on ``data``: the store thread, or the event loop for an
        #: operation that stays in RAM (``MemoryService._owned``).
        self.lock = threading.Lock()
        #: Bytes reserved in RAM for values still arriving (``route``).
        self.incoming = 0
        self.sizes = StoreSizes()
        self.unmanaged_history = UnmanagedHistory(recent_to_old_time)
        # Worker scopes only: what the control plane knows of the worker.
        self._attached = kind is ScopeKind.SERVICE
        self._pid = 0
        #: The engine's memory of this scope (spilling, paused, terminating).
        self._memo = ScopeMemo()
        self.view = self._view()
        self.detached_since: float | None = None
        #: The worker's RSS as its heartbeats report it, else as the monitor last
        #: read it by PID (once a tick); None: neither (no worker, or not visible).
        self.reported_rss: int | None = None
        self.measured_rss: int | None = None
        #: Where process memory would make the engine act next (``watch_lines``).
        self.lines = Lines()
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
    def limit_text(self) -> str:
        return format_bytes(self.memory_limit) if self.memory_limit is not None else "none"

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
    def route(self, size: int, header_size: int) -> Route | None:
        """Where a Put of ``size`` bytes goes, with room reserved there for it; None when
        neither RAM nor disk has room now (the Put may wait for some).

        RAM takes a value no larger than the target share while the scope's managed
        bytes (after spilling down to the target, if the disk can take them), the
        values already arriving and this one stay within the memory limit (the
        monitor's spill rule then deals with process memory, as for any value).
        Anything else is streamed to disk, room
        for it reserved against ``max-spill`` and the free space. Raises
        ResourceExhausted at once for a value that could never fit.
        """
        limit, target = self.memory_limit, self.data.target
        disk_room = self.data.disk_room() if self.data.can_stream else 0.0
        on_disk = size + header_size
        # What RAM will hold once LRU values over the target spill, as far as the disk
        # can take them.
        spillable = min(max(self.managed - target, 0), disk_room) if self.data.can_spill else 0
        floor = self.managed - spillable
        ram_ok = size <= target and (limit is None or floor + self.incoming + size <= limit)
        if ram_ok:
            self.incoming += size
            return "memory"
        if on_disk <= disk_room:
            self.data.reserve_disk(on_disk)
            return "disk"
        ram_capacity = min(target, math.inf if limit is None else limit)
        if size > ram_capacity and on_disk > self.data.disk_capacity():
            share = format_bytes(int(ram_capacity))
            raise ResourceExhausted(
                f"a value of {format_bytes(size)} fits neither in RAM (scope {self.name!r}: "
                f"memory limit {self.limit_text}, target "
                f"share {share}) nor on disk ({self.data.describe_disk()}); "
                "delete values, or raise --memory-limit or memory.max-spill"
            )
        return None

    def release(self, route: Route, size: int, header_size: int) -> None:
        """Give back the room ``route`` reserved, once the value is stored or abandoned."""
        if route == "memory":
            self.incoming -= size
        else:
            self.data.reserve_disk(-(size + header_size))

    def no_room(self, size: int) -> str:
        """Why a Put of ``size`` bytes found no room, and what to do."""
        return (
            f"no room for a value of {format_bytes(size)} in scope {self.name!r}: RAM holds "
            f"{format_bytes(self.managed)} with {format_bytes(self.incoming)} arriving "
            f"(memory limit {self.limit_text})"
            f", and the disk is full ({self.data.describe_disk()}); delete values, raise "
            "--memory-limit or memory.max-spill, or retry later"
        )

    @publishes
    def put(self, key: str, data: Value, crc: int, metadata: bytes) -> Route:
        """Store a whole value, replacing any old one; where it went. Values it takes
        over the target spill only at ``settle``, after the answer."""
        new = self.data.location(key) is None
        self.data.insert(key, Record(data, crc, metadata))
        self._stored(key, new=new)
        location = self.data.location(key)
        assert location is not None
        return location

    @publishes
    def put_many(self, values: Sequence[tuple[str, Value, int, bytes]]) -> list[Route]:
        """Store whole values (key, data, crc, metadata): ``put`` for a batch, published
        once; where each one is once all are stored."""
        records = [(key, Record(data, crc, metadata)) for key, data, crc, metadata in values]
        for (key, _), new in zip(records, self.data.insert_many(records), strict=True):
            self._stored(key, new=new)
        return [self.data.location(key) or "disk" for key, _ in records]

    @publishes
    def read_many(
        self, keys: Sequence[str], budget: int, most: int, *, ram_only: bool = False
    ) -> list[ManyRead] | None:
        """Values for GetMany, in order: whole while each is at most ``most`` bytes and
        all together, with their metadata, ``budget``; larger ones only described (the
        client streams them). A damaged value fails its own item. With ``ram_only``,
        None as soon as a value is on disk (reading it is I/O): nothing is read from
        disk then."""
        reads: list[ManyRead] = []
        for key, held in zip(keys, self.data.read_in_ram(keys), strict=True):
            if held is not None:  # the common case, without a lookup per question
                size, metadata, crc, data = held
                carried = size + len(metadata)
                if size <= most and carried <= budget:
                    budget -= carried
                    if isinstance(data, Segment):
                        crc = data.crc
                    reads.append(ManyRead(key, "memory", size, metadata, crc, data))
                else:  # only described: its bytes, and their CRC32C, travel by a Get
                    reads.append(ManyRead(key, "memory", size, metadata, 0))
                continue
            location = self.data.location(key)
            if location is None:
                reads.append(ManyRead(key))
                continue
            if ram_only:  # not held in RAM, yet there: on disk
                return None
            entry = self.data.entry(key)
            streamed = location == "disk" and self.data.can_stream and entry.size > self.data.target
            carried = entry.size + len(entry.metadata)
            if entry.size > most or carried > budget or streamed:
                reads.append(ManyRead(key, location, entry.size, entry.metadata, entry.crc))
                continue
            try:
                read = self.read(key)
            except DataLoss as loss:  # dropped by ``read``; the other values go on
                reads.append(ManyRead(key, failure=loss))
                continue
            assert read.data is not None  # not streamed, so read whole
            budget -= carried
            reads.append(ManyRead(key, location, entry.size, entry.metadata, entry.crc, read.data))
        return reads

    @publishes
    def settle(self) -> None:
        """Spill least recently used values until managed is back under the target
        (after Puts that went over it, once they have been answered)."""
        self.data.settle()

    def open_writer(self, key: str, metadata: bytes) -> SpillWriter:
        """Start streaming a value into its spill file (the Put's disk route)."""
        return self.data.open_writer(key, metadata)

    @publishes
    def adopt(self, key: str, writer: SpillWriter) -> None:
        """Make a fully streamed value visible; SpillFailed if the disk refuses it."""
        new = self.data.location(key) is None
        self.data.adopt(key, writer)
        self._stored(key, new=new)

    def _stored(self, key: str, *, new: bool) -> None:
        if new:
            self.sorted_keys.added(key)
        if self.journal is not None:
            self.journal.added(self.name, key, new=new)

    def _removed(self, key: str) -> None:
        del self.data[key]
        self.sorted_keys.removed()
        if self.journal is not None:
            self.journal.removed(self.name, key)

    @publishes
    def restore(self, files: Mapping[str, FoundFile]) -> None:
        """Take back the values a previous daemon left on disk (``persist: true``)."""
        assert isinstance(self.data, SpillBuffer), "persist needs the built-in store"
        for key, found in files.items():
            self.data.slow.adopt(key, OnDisk(found.path, found.disk_size, found.header))
            self.sorted_keys.added(key)

    @publishes
    def read(self, key: str) -> ValueRead:
        """A value for Get: whole, or (too large for RAM, on disk) as a checked stream.

        A damaged spill file loses that value only: it is dropped and DataLoss says so.
        """
        location = self.data.location(key)
        if location is None:
            raise NotFound(f"no value under key {key!r} in scope {self.name!r}")
        entry = self.data.entry(key)
        try:
            if location == "disk" and self.data.can_stream and entry.size > self.data.target:
                return ValueRead(entry, location, reader=self.data.open_reader(key))
            record = self.data[key]
            if not self.data.verifies_reads and checksum(record.data) != entry.crc:
                raise SpillFileDamaged(f"the value of {key!r} no longer matches its checksum")
        except SpillFileDamaged as exc:
            raise self.lose(key, str(exc), self.data.spill_file(key)) from None
        return ValueRead(entry, location, data=record.data)

    @publishes
    def share(self, key: str, threshold: int) -> tuple[ValueRead, Segment | None]:
        """``read``, and a value of at least ``threshold`` bytes as a shared-memory
        segment when it is (now) in RAM: the one it is held as, else one made of its
        bytes, held instead of them (built-in store only). A value too large for RAM
        comes as a reader."""
        data = self.data
        if isinstance(data, SpillBuffer):
            held = data.held_segment(key)
            if held is not None and len(held) >= threshold:
                # Read as a Get reads it (its LRU place), but its entry without the
                # CRC32C: the segment travels as itself, and computing the checksum of
                # a value nobody copies would cost the first Get a pass over its bytes.
                record = data[key]
                entry = Entry(record.size, record.metadata, 0)
                return ValueRead(entry, "memory", data=record.data), held
        read = self.read(key)
        if read.data is None or read.entry.size < threshold:
            return read, None
        if not isinstance(self.data, SpillBuffer):
            return read, None
        return read, self.data.share(key)

    @publishes
    def lose(self, key: str, what: str, spill_file: str | None) -> DataLoss:
        """Drop a value found damaged (if ``spill_file`` still holds it); the error to raise."""
        if self.data.location(key) is not None and self.data.spill_file(key) == spill_file:
            self._removed(key)
        return DataLoss(
            f"the value of {key!r} in scope {self.name!r} is lost: {what}. It has been "
            "removed; put it again"
        )

    def stat(self, key: str) -> KeyInfo:
        location = self.data.location(key)
        if location is None:
            raise NotFound(f"no value under key {key!r} in scope {self.name!r}")
        entry = self.data.entry(key)
        return KeyInfo(key, entry.size, location, len(entry.metadata))

    def list_keys(self, prefix: str, after: str, limit: int) -> list[KeyInfo]:
        """Up to ``limit`` keys starting with ``prefix``, sorted, strictly after ``after``."""
        keys = self.sorted_keys.page(self.data, self._has, prefix, after, limit)
        return [self.stat(k) for k in keys]

    def _has(self, key: str) -> bool:
        return self.data.location(key) is not None

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
                self._removed(key)
                deleted += 1
        return deleted

    def clear(self) -> int:
        """Remove every value (a released worker scope); how many there were."""
        return self.delete(list(self.data))
