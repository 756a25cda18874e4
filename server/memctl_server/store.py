"""The spill store: values in RAM up to a target, least recently used ones on disk.

Built, as Dask's ``distributed.spill`` is, by stacking zict mappings::

    SpillBuffer = zict.Buffer(fast={}, slow=Slow, n=target)
    Slow        = one checksummed spill file per value (spillfile.py)

Values are ``Record``s: the bytes, their CRC32C (computed when the Put arrived) and
the Put's metadata. A value read back from disk is checked against its CRC; a damaged
file raises ``SpillFileDamaged``, never returns wrong bytes. Values too large for RAM
are streamed into their file by the Put (``Slow.open_writer``) and back out by the
Get (``Slow.open_reader``), never held whole.

Sizes are tracked incrementally (``zict.LRU.total_weight`` for RAM, ``Slow.total_weight``
for disk) so readings never walk the keys. ``spilled`` counts the bytes really
written to disk, after compression.

A key costs as little as it can, since a daemon may hold millions of small values:
RAM holds each key once (``OneDictLRU``), a small value packed with its checksum
and metadata in one bytes object (``hold``), and what Stat and Get say of a value
comes from there or from its file's header (``entry``), never from a second copy.

Spill errors never lose data: a value that cannot be written (disk full,
``max-spill`` reached, permission denied) stays in RAM, the problem is logged once
per burst with what to do about it, and ``evict()`` returns -1 rather than raising
(Dask's ``ManualEvictProto``).

Not covered here: which scope a value belongs to, metadata, thread hand-off — see
``scopes.py``. The store is not thread-safe beyond what zict gives; the service
drives it from one thread.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import os
import secrets
import shutil
import struct
import time
from collections.abc import Collection, Iterable, Iterator, MutableMapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import zict
from zict.common import NoDefault, locked, nodefault

from memctl.sizes import format_bytes

from .segments import Segment, new_segment
from .spillfile import (
    Compression,
    FileHeader,
    Record,
    SpillReader,
    SpillWriter,
    Value,
    nbytes,
    read_record,
)

logger = logging.getLogger(__name__)

__all__ = ["Compression", "Record", "Value", "nbytes"]

#: A value (and its metadata) up to this size is held in RAM packed in one bytes object
#: with its checksum: one allocation instead of four (the Record, the data object and
#: its buffer, the CRC's int). Larger values keep their Record: beside them those few
#: objects are noise, and packing would copy the value.
PACK_LIMIT = 4096
#: A packed value: CRC32C and metadata length, then the metadata, then the data.
_PACKED = struct.Struct("<II")

#: A value as RAM holds it: packed bytes (small values) or its Record.
Held = bytes | Record


@dataclass(frozen=True, slots=True)
class Entry:
    """What Stat and Get say of a value besides its bytes."""

    size: int
    metadata: bytes
    #: CRC32C of the value, taken when it arrived.
    crc: int


def hold(value: Held) -> Held:
    """The form RAM keeps ``value`` in: packed if it is small."""
    if isinstance(value, bytes) or nbytes(value.data) + len(value.metadata) > PACK_LIMIT:
        return value
    header = _PACKED.pack(crc_of(value), len(value.metadata))
    return b"".join((header, value.metadata, value.data))


def crc_of(record: Record) -> int:
    """A held Record's CRC32C: a segment's is computed when first asked for."""
    data = record.data
    return data.crc if isinstance(data, Segment) else record.crc


def unpack(held: Held) -> Record:
    """The Record of a held value (a packed one's data copied out: a few KiB at most)."""
    if isinstance(held, Record):
        return held
    crc, metadata_size = _PACKED.unpack_from(held)
    start = _PACKED.size + metadata_size
    return Record(held[start:], crc, held[_PACKED.size : start])


def held_parts(held: Held) -> tuple[int, bytes, int, Value]:
    """A held value's size, metadata, CRC32C and data, in one unpacking (0 for the
    CRC32C of a segment: ``crc_of`` computes it where it is needed)."""
    if isinstance(held, Record):
        return held.size, held.metadata, held.crc, held.data
    crc, metadata_size = _PACKED.unpack_from(held)
    start = _PACKED.size + metadata_size
    return len(held) - start, held[_PACKED.size : start], crc, held[start:]


def held_entry(held: Held) -> Entry:
    """A held value's entry, without copying its data out."""
    if isinstance(held, Record):
        return Entry(held.size, held.metadata, crc_of(held))
    crc, metadata_size = _PACKED.unpack_from(held)
    start = _PACKED.size + metadata_size
    return Entry(len(held) - start, held[_PACKED.size : start], crc)


def held_size(_key: str, held: Held) -> int:
    """A held value's size in bytes: its weight in the LRU."""
    if isinstance(held, Record):
        return held.size
    return len(held) - _PACKED.size - int(_PACKED.unpack_from(held)[1])


@runtime_checkable
class ManualEvictProto(Protocol):
    """What a user-supplied store must also have for target/spill to stay active.

    The same duck-typed API as ``distributed.spill.ManualEvictProto``.
    """

    @property
    def fast(self) -> object:
        """Values held in RAM; only tested for emptiness."""

    def evict(self) -> int:
        """Move the least recently used value to disk; its size, or -1 on failure."""


@dataclass(frozen=True)
class SpillCounters:
    """Cumulative disk traffic of one store, for the metrics."""

    #: In-RAM bytes and values moved to disk.
    spilled_bytes: int = 0
    spilled_values: int = 0
    #: Bytes and values read back from disk.
    read_bytes: int = 0
    read_values: int = 0
    #: Seconds spent compressing and writing spilled values.
    spill_seconds: float = 0.0


class MaxSpillExceeded(Exception):
    """Writing a value would take the spill directory over ``memory.max-spill``."""


def resolve_compression(setting: str) -> Compression:
    """``auto`` means lz4 when it is installed, as in Dask; else none."""
    if setting == "auto":
        try:
            import lz4.frame  # noqa: F401
        except ImportError:
            return "none"
        return "lz4"
    if setting in ("lz4", "zlib", "none"):
        return setting  # type: ignore[return-value]
    raise ValueError(f"unknown spill compression {setting!r}; use auto, lz4, zlib or none")


def file_stem(key: str) -> str:
    """A spill file's name: a digest of the key (keys are user input, never paths) and a
    random suffix, so a value being streamed never collides with the one it replaces."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{digest}-{secrets.token_hex(4)}"


class SpillBudget:
    """Bytes on disk across every scope, against ``memory.max-spill`` (host-wide).

    ``reserved`` counts values being streamed to disk, so that concurrent Puts cannot
    together promise more than there is room for.
    """

    def __init__(self, max_bytes: int | Literal[False] = False):
        self.max_bytes = max_bytes
        self.used = 0
        self.reserved = 0

    def room(self) -> float:
        if self.max_bytes is False:
            return math.inf
        return self.max_bytes - self.used - self.reserved

    def describe(self) -> str:
        if self.max_bytes is False:
            return f"no max-spill, {format_bytes(self.used)} spilled"
        return f"max-spill {format_bytes(self.max_bytes)}, {format_bytes(self.used)} spilled"


@dataclass(frozen=True, slots=True)
class OnDisk:
    """Where a spilled value is and what its file says (one per value on disk: slots)."""

    path: str
    disk_size: int
    header: FileHeader


# --- the disk tier -------------------------------------------------------------------
class Slow(MutableMapping[str, Held]):
    """The disk tier: one checksummed spill file per value (``spillfile.py``), files
    readable by the service's user only (0600); enforces ``max-spill`` and counts the
    real bytes on disk.

    Reads are checked: a damaged file raises ``SpillFileDamaged`` and is never
    returned as data.
    """

    def __init__(
        self, directory: Path, *, scope: str, budget: SpillBudget, compression: Compression
    ):
        self.directory = directory
        self.scope = scope
        self.budget = budget
        self.compression = compression
        self.files: dict[str, OnDisk] = {}
        self.total_weight = 0
        self.seconds = 0.0

    def _ensure_directory(self) -> str:
        self.directory.mkdir(mode=0o700, exist_ok=True)
        return str(self.directory)

    def __setitem__(self, key: str, value: Held) -> None:
        started = time.perf_counter()
        record = unpack(value)
        try:
            # The checksum taken when the value arrived, not one of the bytes as they are
            # now: a value damaged while in RAM is then caught when it is read back.
            data = record.data
            # A segment not yet checksummed is checksummed as it is written.
            crc = data._crc if isinstance(data, Segment) else record.crc
            writer = self.open_writer(key, record.metadata, crc=crc)
            writer.write(record.data)
            header, disk_size = writer.commit()
            self.adopt(key, OnDisk(writer.path, disk_size, header))
        finally:
            self.seconds += time.perf_counter() - started

    def open_writer(self, key: str, metadata: bytes, crc: int | None = None) -> SpillWriter:
        """A writer for a value streamed straight to disk (``adopt`` its result), or
        spilled from RAM with its ``crc``."""
        return SpillWriter(
            self._ensure_directory(),
            file_stem(key),
            scope=self.scope,
            key=key,
            metadata=metadata,
            compression=self.compression,
            crc=crc,
        )

    def adopt(self, key: str, on_disk: OnDisk) -> None:
        """Take a complete spill file as the value of ``key`` (replacing any older one).

        Refuses (and removes it) if it takes the directory over ``max-spill``.
        """
        growth = on_disk.disk_size - (self.files[key].disk_size if key in self.files else 0)
        if growth > self.budget.room():
            os.remove(on_disk.path)
            raise MaxSpillExceeded(
                f"writing {format_bytes(on_disk.disk_size)} to disk would exceed "
                f"memory.max-spill ({self.budget.describe()})"
            )
        if key in self.files:
            self._remove(key)
        self.files[key] = on_disk
        self.total_weight += on_disk.disk_size
        self.budget.used += on_disk.disk_size

    def __getitem__(self, key: str) -> Held:
        on_disk = self.files[key]
        return hold(read_record(on_disk.path, key, on_disk.header.crc))

    def open_reader(self, key: str) -> SpillReader:
        on_disk = self.files[key]
        return SpillReader(on_disk.path, key, on_disk.header.crc)

    def _remove(self, key: str) -> None:
        on_disk = self.files.pop(key)
        with suppress(FileNotFoundError):
            os.remove(on_disk.path)
        self.total_weight -= on_disk.disk_size
        self.budget.used -= on_disk.disk_size

    def __delitem__(self, key: str) -> None:
        self._remove(key)

    def __contains__(self, key: object) -> bool:
        return key in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


# --- the RAM tier --------------------------------------------------------------------
class OneDictLRU(zict.LRU[str, Held]):
    """zict's LRU holding each key once.

    ``zict.LRU`` keeps a key in three dicts: its value in ``d``, its place in
    ``order``, its weight in ``weights`` (~31 bytes a key each at a million keys).
    Here ``d``'s own insertion order is the LRU order (a read moves its key to the
    end) and a weight is recomputed from the value (``held_size``) when it leaves, so
    ``order`` and ``weights`` stay empty. The methods below are zict 3.0's with only
    that changed; heavy keys, callbacks, their failures and ``n`` work as in zict.
    """

    d: dict[str, Held]

    @locked
    def __getitem__(self, key: str) -> Held:
        value = self.d.pop(key)
        self.d[key] = value
        return value

    @locked
    def get_all_or_nothing(self, keys: Collection[str]) -> dict[str, Held]:
        result = {key: self.d[key] for key in keys}
        for key in keys:
            self.d[key] = self.d.pop(key)
        return result

    def __setitem__(self, key: str, value: Held) -> None:
        self.set_noevict(key, value)
        try:
            self.evict_until_below_target()
        except Exception:
            held = self.d.get(key)
            if held is not None and self.weight(key, held) > self.n and key not in self.heavy:
                # The new value alone is over n and could not leave: evict the rest.
                with suppress(Exception):
                    while len(self.d) > 1:
                        self.evict()
            raise

    @locked
    def set_noevict(self, key: str, value: Held) -> None:
        self.discard(key)
        weight = self.weight(key, value)
        if key in self._cancel_evict:
            self._cancel_evict[key] = True
        self.d[key] = value
        if weight > self.n:
            self.heavy.add(key)  # evicted first
        self.total_weight += weight

    @locked
    def evict(
        self, key: str | NoDefault = nodefault
    ) -> tuple[str, Held, float] | tuple[None, None, float]:
        if isinstance(key, NoDefault):
            try:
                key = next(iter(self.heavy or self.d))
            except StopIteration:
                raise KeyError("evict(): dictionary is empty") from None
        if key in self._cancel_evict:
            return None, None, 0
        # The value stays in d until every callback has succeeded.
        value = self.d[key]
        self.heavy.discard(key)
        self._cancel_evict[key] = False
        try:
            with self.unlock():
                for callback in self.on_evict:
                    callback(key, value)
                if self._cancel_evict[key]:
                    for callback in self.on_cancel_evict:
                        callback(key, value)
                    return None, None, 0
        finally:
            del self._cancel_evict[key]
        del self.d[key]
        weight = self.weight(key, value)
        self.total_weight -= weight
        return key, value, weight

    @locked
    def __delitem__(self, key: str) -> None:
        if key in self._cancel_evict:
            self._cancel_evict[key] = True
        value = self.d.pop(key)
        self.heavy.discard(key)
        self.total_weight -= self.weight(key, value)


# --- the buffer ----------------------------------------------------------------------
class SpillBuffer(zict.Buffer[str, Held]):
    """A mapping of keys to Records that spills its LRU values beyond ``target``.

    ``target`` is in bytes (``inf`` for none). A value heavier than the target goes
    straight to disk (zict's "heavy" keys). Values go in as Records and come out as
    Records; in between RAM holds them as ``hold`` makes them.
    """

    fast: OneDictLRU
    slow: Slow
    can_stream = True
    verifies_reads = True

    def __init__(
        self,
        directory: Path,
        target: float,
        *,
        budget: SpillBudget,
        compression: Compression = "none",
        scope: str = "",
    ):
        super().__init__(
            fast={},
            slow=Slow(directory, scope=scope, budget=budget, compression=compression),
            n=target,
            weight=held_size,
            fast_to_slow_callbacks=[self._count_spill],
            slow_to_fast_callbacks=[self._count_read],
        )
        # zict.Buffer's own LRU, as Buffer makes it, but on one dict.
        self.fast = OneDictLRU(
            target,
            {},
            weight=held_size,
            on_evict=[self.fast_to_slow],
            on_cancel_evict=[self._cancel_evict],
        )
        self.directory = directory
        self._failing: str | None = None
        self._spilled = [0, 0]
        self._read = [0, 0]

    def _count_spill(self, key: str, value: Held) -> None:
        self._spilled[0] += held_size(key, value)
        self._spilled[1] += 1

    def _count_read(self, key: str, value: Held) -> None:
        self._read[0] += held_size(key, value)
        self._read[1] += 1

    @property
    def counters(self) -> SpillCounters:
        return SpillCounters(
            spilled_bytes=self._spilled[0],
            spilled_values=self._spilled[1],
            read_bytes=self._read[0],
            read_values=self._read[1],
            spill_seconds=self.slow.seconds,
        )

    @contextmanager
    def _handle_errors(self) -> Iterator[None]:
        """Translate spill failures in one place, so nothing above sees them.

        zict guarantees the value that failed to move is still in ``fast``. Log once
        per burst: the first failure of a kind, and again after a success.
        """
        try:
            yield
        except (MaxSpillExceeded, OSError) as exc:
            if isinstance(exc, MaxSpillExceeded):
                kind, advice = "max-spill", "raise memory.max-spill or delete values"
            else:
                kind = type(exc).__name__
                advice = f"check free space and permissions of {self.directory}"
            if self._failing != kind:
                logger.warning("Spill to disk failed, keeping data in RAM: %s; %s", exc, advice)
                self._failing = kind
            raise SpillFailed(f"{exc}; {advice}") from exc
        else:
            self._failing = None

    def __setitem__(self, key: str, value: Held) -> None:
        try:
            with self._handle_errors():
                super().__setitem__(key, hold(value))
        except SpillFailed:
            pass  # the value is stored (in RAM); the failure is logged

    def read_in_ram(self, keys: Sequence[str]) -> list[tuple[int, bytes, int, Value] | None]:
        """``held_parts`` of each key held in RAM (None for the others), each moved to
        the recent end of the LRU: GetMany's fast path, one lock for the lot."""
        fast = self.fast
        found: list[tuple[int, bytes, int, Value] | None] = []
        with fast.lock:
            d = fast.d
            for key in keys:
                held = d.pop(key, None)
                if held is None:
                    found.append(None)
                    continue
                d[key] = held
                found.append(held_parts(held))
        return found

    def insert_many(self, records: Sequence[tuple[str, Record]]) -> list[bool]:
        """``insert`` for a batch: whether each key is new. Values for RAM go in under
        one lock, without a lookup per key in the disk tier; one heavier than the
        target, or replacing a value on disk, goes in alone."""
        alone = {k for k, r in records if r.size > self.n or k in self.slow.files}
        news = {k: k not in self.slow.files for k in alone}
        for key, record in records:
            if key in alone:
                self.insert(key, record)
        fast = self.fast
        with fast.lock:
            d = fast.d
            for key, record in records:
                if key in alone:
                    continue
                old = d.pop(key, None)
                if old is not None:
                    fast.total_weight -= held_size(key, old)
                d[key] = hold(record)
                fast.total_weight += record.size
                news.setdefault(key, old is None)
        return [news[key] for key, _ in records]

    def insert(self, key: str, value: Held) -> None:
        """Store a value in RAM without spilling others to make room: ``settle`` does
        that, after the Put has been answered. A value heavier than the target goes
        to disk at once, as with ``[]=``."""
        if self.fast.weight(key, value) > self.n:
            self[key] = value
            return
        super().set_noevict(key, hold(value))

    def settle(self) -> None:
        """Spill least recently used values until RAM is back under the target."""
        try:
            with self._handle_errors():
                self.fast.evict_until_below_target()
        except SpillFailed:
            pass  # the values stay in RAM; the failure is logged

    def open_writer(self, key: str, metadata: bytes) -> SpillWriter:
        """Stream a value straight into a spill file; ``adopt`` it when complete."""
        return self.slow.open_writer(key, metadata)

    def adopt(self, key: str, writer: SpillWriter) -> None:
        """Make a streamed value the value of ``key``. Raises SpillFailed (the file is
        removed, any old value kept) if the disk or max-spill cannot take it."""
        with self._handle_errors():
            path = writer.path
            header, disk_size = writer.commit()
            self.slow.adopt(key, OnDisk(path, disk_size, header))
            if key in self.fast:  # the old value, replaced only now that the new one is safe
                del self.fast[key]
            self._spilled[0] += header.size
            self._spilled[1] += 1

    def held_segment(self, key: str) -> Segment | None:
        """The segment ``key`` is held as in RAM, if it is one (nothing is touched)."""
        held = self.fast.d.get(key)
        if isinstance(held, Record) and isinstance(held.data, Segment):
            return held.data
        return None

    def share(self, key: str) -> Segment | None:
        """The in-RAM value of ``key`` as a shared-memory segment, made of its bytes
        (and held instead of them, its weight and LRU place unchanged) unless it is
        one already; None if it is not in RAM or too small to be worth one."""
        held = self.fast.d.get(key)
        if not isinstance(held, Record):  # packed values are a few KiB at most
            return None
        if isinstance(held.data, Segment):
            return held.data
        segment = new_segment([held.data], held.size)
        segment._crc = held.crc
        self.fast.d[key] = Record(segment, held.crc, held.metadata)
        return segment

    def open_reader(self, key: str) -> SpillReader:
        """Read a value on disk back in pieces, without bringing it to RAM."""
        return self.slow.open_reader(key)

    def __getitem__(self, key: str) -> Record:
        # Bringing a value back to RAM may push others out; if that fails the value
        # is still returned (Dask's SpillBuffer does the same).
        try:
            with self._handle_errors():
                return unpack(super().__getitem__(key))
        except SpillFailed:
            return unpack(self.fast[key])

    def __iter__(self) -> Iterator[str]:
        # One thread drives the store, so a key is in RAM or on disk, never both:
        # no set of every key seen, as zict.Buffer keeps against other threads.
        return itertools.chain(self.fast, self.slow)

    def entry(self, key: str) -> Entry:
        """What Stat and Get say of a value, from RAM or its file's header; KeyError if
        there is none. Leaves the LRU order as it is."""
        held = self.fast.d.get(key)
        if held is not None:
            return held_entry(held)
        header = self.slow.files[key].header
        return Entry(header.size, header.metadata, header.crc)

    def evict(self) -> int:
        """Move the least recently used value to disk: its size, -1 on failure."""
        try:
            with self._handle_errors():
                _, _, weight = self.fast.evict()
                return int(weight)
        except (SpillFailed, KeyError):
            return -1

    def evict_keys(self, keys: Iterable[str], moved: list[int]) -> None:
        """Move the named in-RAM values to disk, adding ``[bytes, values]`` to ``moved``.

        Raises SpillFailed if a write fails; ``moved`` then says what did move.
        """
        for key in keys:
            if key in self.fast:
                with self._handle_errors():
                    _, _, weight = self.fast.evict(key)
                moved[0] += int(weight)
                moved[1] += 1

    def evict_bytes(self, wanted: float, moved: list[int]) -> None:
        """Move LRU values to disk until ``wanted`` bytes have moved or RAM is empty."""
        start = moved[0]
        while moved[0] - start < wanted and len(self.fast):
            with self._handle_errors():
                _, _, weight = self.fast.evict()
            moved[0] += int(weight)
            moved[1] += 1

    can_spill = True

    @property
    def target(self) -> float:
        """Bytes in RAM above which least recently used values spill (zict's ``n``)."""
        return self.n

    @target.setter
    def target(self, value: float) -> None:
        self.n = value
        self.fast.evict_until_below_target()

    @property
    def keys_in_memory(self) -> int:
        return len(self.fast)

    @property
    def keys_on_disk(self) -> int:
        return len(self.slow)

    def disk_room(self) -> float:
        """Bytes that may still be spilled now: max-spill and the disk's free space, less
        what values being streamed to disk have reserved."""
        return min(self.slow.budget.room(), self._free_disk() - self.slow.budget.reserved)

    def disk_capacity(self) -> float:
        """Bytes that could be spilled if nothing else were arriving."""
        budget = self.slow.budget
        return min(budget.room() + budget.reserved, self._free_disk())

    def reserve_disk(self, nbytes: int) -> None:
        """Reserve (or, negative, give back) disk room for a value being streamed."""
        self.slow.budget.reserved += nbytes

    def describe_disk(self) -> str:
        return f"{self.slow.budget.describe()}, {format_bytes(self._free_disk())} free on disk"

    def _free_disk(self) -> int:
        """Free bytes on the spill directory's filesystem (the scope's own directory is
        made on the first spill, so ask its parent)."""
        return shutil.disk_usage(self.directory.parent).free

    def spill_file(self, key: str) -> str | None:
        """The path of a value's spill file; None while it is in RAM."""
        on_disk = self.slow.files.get(key)
        return on_disk.path if on_disk else None

    @property
    def managed(self) -> int:
        """Bytes of values held in RAM."""
        return int(self.fast.total_weight)

    @property
    def spilled(self) -> int:
        """Bytes written to disk, after compression."""
        return self.slow.total_weight

    def location(self, key: str) -> Literal["memory", "disk"] | None:
        if key in self.fast:
            return "memory"
        if key in self.slow:
            return "disk"
        return None


class SpillFailed(Exception):
    """A spill did not happen; the value is still in RAM. The message says what to do."""
