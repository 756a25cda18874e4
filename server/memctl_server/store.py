"""The spill store: values in RAM up to a target, least recently used ones on disk.

Built, as Dask's ``distributed.spill`` is, by stacking zict mappings::

    SpillBuffer = zict.Buffer(fast={}, slow=Slow, n=target)
    Slow        = zict.Func(compress, decompress, HashedKeys(PrivateFile(directory)))

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
import shutil
import time
import zlib
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

import zict
import zict.common

from memctl.sizes import format_bytes

logger = logging.getLogger(__name__)

#: What the store holds: any bytes-like object (values read back from disk are
#: bytearrays or memoryviews, to avoid a copy).
Value = bytes | bytearray | memoryview


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


def nbytes(value: Value) -> int:
    """Size of a bytes-like value in RAM."""
    return value.nbytes if isinstance(value, memoryview) else len(value)


# --- compression -----------------------------------------------------------------
# Each file starts with one byte saying how the rest is encoded, so the setting can
# change between runs and incompressible data is stored as it is.
_RAW, _LZ4, _ZLIB = b"\x00", b"\x01", b"\x02"
#: Compress only if a sample shrinks below this fraction (as Dask's maybe_compress).
_WORTH_IT = 0.9
_SAMPLE = 64 * 1024

Compression = Literal["lz4", "zlib", "none"]


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


def _compressor(kind: Compression) -> tuple[bytes, Callable[[memoryview], bytes]] | None:
    if kind == "lz4":
        import lz4.frame

        return _LZ4, lz4.frame.compress
    if kind == "zlib":
        return _ZLIB, lambda data: zlib.compress(data, 1)
    return None


def make_dump(kind: Compression) -> Callable[[Value], list[Value]]:
    """Return ``dump(value) -> list of buffers`` for ``kind``; the first is the tag."""
    compressor = _compressor(kind)

    def dump(value: Value) -> list[Value]:
        if compressor is not None and nbytes(value) > 0:
            tag, compress = compressor
            view = memoryview(value)
            sample = view[:_SAMPLE]
            if len(compress(sample)) < _WORTH_IT * sample.nbytes:
                packed = compress(view)
                if len(packed) < _WORTH_IT * view.nbytes:
                    return [tag, packed]
        return [_RAW, value]

    return dump


def load(stored: Value) -> Value:
    """Undo ``dump``: read the tag, decompress if needed, never copy raw data."""
    view = memoryview(stored)
    tag, body = bytes(view[:1]), view[1:]
    if tag == _RAW:
        return body
    if tag == _LZ4:
        import lz4.frame

        return lz4.frame.decompress(body)  # type: ignore[no-any-return]
    if tag == _ZLIB:
        return zlib.decompress(body)
    raise ValueError(f"spill file has unknown encoding tag {tag!r}: corrupted")


# --- the disk tier -------------------------------------------------------------------
class PrivateFile(zict.File):
    """``zict.File`` whose files are readable by the service's user only (0600), and
    which removes a half-written file when a write fails (disk full)."""

    def __setitem__(self, key: str, value: Value | list[Value] | tuple[Value, ...]) -> None:
        self.discard(key)
        name = self._safe_key(key)
        path = os.path.join(self.directory, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with open(fd, "wb") as fh:
                fh.writelines(value if isinstance(value, list | tuple) else [value])
        except BaseException:
            with suppress(FileNotFoundError):
                os.remove(path)
            raise
        self.filenames[key] = name


class HashedKeys(zict.common.ZictBase[str, Any]):
    """Store under a digest of each key, never the key itself.

    Keys are arbitrary UTF-8 strings up to 4096 bytes (``../../etc/passwd``,
    ``a/b\\x00c``); file names are 64 hex characters.
    """

    # Values are written as a list of frames and read back as one buffer: Any.
    def __init__(self, d: MutableMapping[str, Any]):
        super().__init__()
        self.d = d
        self.names: dict[str, str] = {}

    @staticmethod
    def digest(key: str) -> str:
        return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()

    def __getitem__(self, key: str) -> Any:
        return self.d[self.names[key]]

    def __setitem__(self, key: str, value: Any) -> None:
        name = self.digest(key)
        self.d[name] = value
        self.names[key] = name

    def __delitem__(self, key: str) -> None:
        del self.d[self.names.pop(key)]

    def __contains__(self, key: object) -> bool:
        return key in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class SpillBudget:
    """Bytes on disk across every scope, against ``memory.max-spill`` (host-wide)."""

    def __init__(self, max_bytes: int | Literal[False] = False):
        self.max_bytes = max_bytes
        self.used = 0

    def room(self) -> float:
        return math.inf if self.max_bytes is False else self.max_bytes - self.used

    def describe(self) -> str:
        if self.max_bytes is False:
            return f"no max-spill, {format_bytes(self.used)} spilled"
        return f"max-spill {format_bytes(self.max_bytes)}, {format_bytes(self.used)} spilled"


class Slow(zict.Func[str, Value, Any]):
    """The disk tier: compresses, enforces ``max-spill``, counts real bytes on disk."""

    def __init__(self, directory: Path, *, budget: SpillBudget, compression: Compression):
        super().__init__(make_dump(compression), load, HashedKeys(PrivateFile(directory)))
        self.budget = budget
        self.weight_by_key: dict[str, int] = {}
        self.total_weight = 0
        self.seconds = 0.0

    def __setitem__(self, key: str, value: Value) -> None:
        started = time.perf_counter()
        try:
            self._write(key, value)
        finally:
            self.seconds += time.perf_counter() - started

    def _write(self, key: str, value: Value) -> None:
        frames: list[Value] = self.dump(value)
        size = sum(nbytes(f) for f in frames)
        growth = size - self.weight_by_key.get(key, 0)
        if growth > self.budget.room():
            raise MaxSpillExceeded(
                f"writing {format_bytes(size)} to disk would exceed memory.max-spill "
                f"({self.budget.describe()})"
            )
        self.d[key] = frames
        self.total_weight += growth
        self.budget.used += growth
        self.weight_by_key[key] = size

    def __delitem__(self, key: str) -> None:
        super().__delitem__(key)
        size = self.weight_by_key.pop(key, 0)
        self.total_weight -= size
        self.budget.used -= size


# --- the buffer ----------------------------------------------------------------------
class SpillBuffer(zict.Buffer[str, Value]):
    """A ``MutableMapping[str, bytes]`` that spills its LRU values beyond ``target``.

    ``target`` is in bytes (``inf`` for none). A value heavier than the target goes
    straight to disk (zict's "heavy" keys).
    """

    fast: zict.LRU[str, Value]
    slow: Slow

    def __init__(
        self,
        directory: Path,
        target: float,
        *,
        budget: SpillBudget,
        compression: Compression = "none",
    ):
        super().__init__(
            fast={},
            slow=Slow(directory, budget=budget, compression=compression),
            n=target,
            weight=lambda _key, value: nbytes(value),
            fast_to_slow_callbacks=[self._count_spill],
            slow_to_fast_callbacks=[self._count_read],
        )
        self.directory = directory
        self._failing: str | None = None
        self._spilled = [0, 0]
        self._read = [0, 0]

    def _count_spill(self, _key: str, value: Value) -> None:
        self._spilled[0] += nbytes(value)
        self._spilled[1] += 1

    def _count_read(self, _key: str, value: Value) -> None:
        self._read[0] += nbytes(value)
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

    def __setitem__(self, key: str, value: Value) -> None:
        try:
            with self._handle_errors():
                super().__setitem__(key, value)
        except SpillFailed:
            pass  # the value is stored (in RAM); the failure is logged

    def __getitem__(self, key: str) -> Value:
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
        """Bytes that may still be spilled: max-spill and the disk's free space."""
        return min(self.slow.budget.room(), shutil.disk_usage(self.directory).free)

    def describe_disk(self) -> str:
        free = shutil.disk_usage(self.directory).free
        return f"{self.slow.budget.describe()}, {format_bytes(free)} free on disk"

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
