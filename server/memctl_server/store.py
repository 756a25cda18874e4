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
import logging
import math
import os
import secrets
import shutil
import time
from collections.abc import Iterable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import zict

from memctl.sizes import format_bytes

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


@dataclass(frozen=True)
class OnDisk:
    """Where a spilled value is and what its file says."""

    path: str
    disk_size: int
    header: FileHeader


# --- the disk tier -------------------------------------------------------------------
class Slow(MutableMapping[str, Record]):
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

    def __setitem__(self, key: str, record: Record) -> None:
        started = time.perf_counter()
        try:
            # The checksum taken when the value arrived, not one of the bytes as they are
            # now: a value damaged while in RAM is then caught when it is read back.
            writer = self.open_writer(key, record.metadata, crc=record.crc)
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

    def __getitem__(self, key: str) -> Record:
        on_disk = self.files[key]
        return read_record(on_disk.path, key, on_disk.header.crc)

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


# --- the buffer ----------------------------------------------------------------------
class SpillBuffer(zict.Buffer[str, Record]):
    """A ``MutableMapping[str, Record]`` that spills its LRU values beyond ``target``.

    ``target`` is in bytes (``inf`` for none). A value heavier than the target goes
    straight to disk (zict's "heavy" keys).
    """

    fast: zict.LRU[str, Record]
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
            weight=lambda _key, record: record.size,
            fast_to_slow_callbacks=[self._count_spill],
            slow_to_fast_callbacks=[self._count_read],
        )
        self.directory = directory
        self._failing: str | None = None
        self._spilled = [0, 0]
        self._read = [0, 0]

    def _count_spill(self, _key: str, record: Record) -> None:
        self._spilled[0] += record.size
        self._spilled[1] += 1

    def _count_read(self, _key: str, record: Record) -> None:
        self._read[0] += record.size
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

    def __setitem__(self, key: str, value: Record) -> None:
        try:
            with self._handle_errors():
                super().__setitem__(key, value)
        except SpillFailed:
            pass  # the value is stored (in RAM); the failure is logged

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

    def open_reader(self, key: str) -> SpillReader:
        """Read a value on disk back in pieces, without bringing it to RAM."""
        return self.slow.open_reader(key)

    def __getitem__(self, key: str) -> Record:
        # Bringing a value back to RAM may push others out; if that fails the value
        # is still returned (Dask's SpillBuffer does the same).
        try:
            with self._handle_errors():
                return super().__getitem__(key)
        except SpillFailed:
            return self.fast[key]

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
