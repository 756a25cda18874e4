"""A user-supplied store: any ``MutableMapping[str, bytes]`` in place of the built-in one.

Configured as ``store.factory: "package.module:callable"`` and ``store.kwargs``; each
scope calls the factory once for its own mapping. As with Dask's ``data=``, the
target and spill thresholds stay active only if the mapping also has ``evict() ->
int`` and ``fast`` (``ManualEvictProto``); otherwise the service says once that they
are off, and values stay wherever the mapping keeps them.

``ForeignStore`` gives such a mapping the few extra methods scopes use (location,
managed bytes, eviction). What it cannot know it does not invent: ``spilled`` is 0,
and ``managed`` counts values in ``fast`` when ``fast`` is a container, else all.
The mapping holds the bytes only; checksums and metadata stay here, and every read
is checked against the checksum, since the mapping may keep values anywhere.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import (
    Callable,
    Container,
    Iterable,
    Iterator,
    MutableMapping,
    Sequence,
    Sized,
)
from typing import Any, Literal, cast

from .errors import FailedPrecondition
from .spillfile import SpillReader, SpillWriter
from .store import (
    Entry,
    ManualEvictProto,
    Record,
    SpillCounters,
    SpillFailed,
    Value,
    nbytes,
)

logger = logging.getLogger(__name__)

StoreFactory = Callable[..., MutableMapping[str, Any]]


def load_factory(import_path: str) -> StoreFactory:
    """Import ``package.module:callable``; a clear error if it is not there."""
    module_name, _, attribute = import_path.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
        for part in attribute.split("."):
            target = getattr(target, part)
    except (ImportError, AttributeError) as exc:
        raise FailedPrecondition(
            f"store.factory {import_path!r} cannot be imported ({exc}); install the module "
            "or fix the path"
        ) from exc
    if not callable(target):
        raise FailedPrecondition(f"store.factory {import_path!r} is not callable")
    return cast(StoreFactory, target)


class ForeignStore:
    """A user's mapping, seen through the interface of ``SpillBuffer``."""

    can_stream = False
    verifies_reads = False

    def __init__(self, mapping: MutableMapping[str, Any], target: float, name: str):
        self.mapping = mapping
        self.target = target
        #: What the mapping (holding the bytes only) does not know of each value.
        self.entries: dict[str, Entry] = {}
        self.total = 0
        self._evicted = [0, 0]
        self.can_spill = isinstance(mapping, ManualEvictProto)
        if not self.can_spill:
            logger.warning(
                "Scope %r: the configured store %s has no evict() and fast, so the target "
                "and spill thresholds are off for it (pause and terminate still apply)",
                name,
                type(mapping).__name__,
            )

    def _fast(self) -> object:
        return cast(ManualEvictProto, self.mapping).fast if self.can_spill else None

    def __setitem__(self, key: str, record: Record) -> None:
        value = record.data
        self.mapping[key] = value
        old = self.entries.get(key)
        self.total += nbytes(value) - (old.size if old is not None else 0)
        self.entries[key] = Entry(nbytes(value), record.metadata, record.crc)
        if self.can_spill:
            while self.managed > self.target and self._evict_one() > 0:
                pass

    def read_in_ram(self, keys: Sequence[str]) -> list[tuple[int, bytes, int, Value] | None]:
        """No fast path: a user's store may do I/O on any read."""
        return [None] * len(keys)

    def insert_many(self, records: Sequence[tuple[str, Record]]) -> list[bool]:
        """``insert`` each in turn; whether each key is new."""
        news = []
        for key, record in records:
            news.append(key not in self.entries)
            self.insert(key, record)
        return news

    def insert(self, key: str, record: Record) -> None:
        """A user's store spills as it stores: nothing is left for ``settle``."""
        self[key] = record

    def settle(self) -> None:
        """Nothing to do: ``insert`` spilled already."""

    def __getitem__(self, key: str) -> Record:
        entry = self.entries[key]
        return Record(self.mapping[key], entry.crc, entry.metadata)

    def __delitem__(self, key: str) -> None:
        del self.mapping[key]
        self.total -= self.entries.pop(key).size

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def entry(self, key: str) -> Entry:
        return self.entries[key]

    def open_writer(self, key: str, metadata: bytes) -> SpillWriter:
        raise AssertionError("a configured store takes whole values (can_stream is False)")

    def adopt(self, key: str, writer: SpillWriter) -> None:
        raise AssertionError("a configured store takes whole values (can_stream is False)")

    def open_reader(self, key: str) -> SpillReader:
        raise AssertionError("a configured store returns whole values (can_stream is False)")

    def spill_file(self, key: str) -> str | None:
        return None

    def disk_capacity(self) -> float:
        return 0.0

    def reserve_disk(self, nbytes: int) -> None:
        raise AssertionError("a configured store has no disk of memctl's (can_stream is False)")

    def location(self, key: str) -> Literal["memory", "disk"] | None:
        if key not in self.entries:
            return None
        fast = self._fast()
        if isinstance(fast, Container) and key not in fast:
            return "disk"
        return "memory"

    @property
    def managed(self) -> int:
        fast = self._fast()
        if isinstance(fast, Iterable) and isinstance(fast, Container):
            return sum(entry.size for k in fast if (entry := self.entries.get(k)) is not None)
        return self.total

    @property
    def spilled(self) -> int:
        return 0

    @property
    def keys_in_memory(self) -> int:
        fast = self._fast()
        return len(fast) if isinstance(fast, Sized) else len(self.entries)

    @property
    def keys_on_disk(self) -> int:
        return len(self.entries) - self.keys_in_memory

    def disk_room(self) -> float:
        return 0.0  # memctl streams nothing to the mapping's disk, if it has one

    def describe_disk(self) -> str:
        return f"the configured store {type(self.mapping).__name__} decides"

    def _evict_one(self) -> int:
        size = cast(ManualEvictProto, self.mapping).evict()
        if size > 0:
            self._evicted[0] += size
            self._evicted[1] += 1
        return size

    @property
    def counters(self) -> SpillCounters:
        """What evict() reported moving; reads back are the mapping's own business."""
        return SpillCounters(spilled_bytes=self._evicted[0], spilled_values=self._evicted[1])

    def evict_bytes(self, wanted: float, moved: list[int]) -> None:
        if not self.can_spill:
            raise SpillFailed("the configured store has no evict(); it cannot spill")
        start = moved[0]
        while moved[0] - start < wanted:
            size = self._evict_one()
            if size < 0 and moved[0] == start:
                raise SpillFailed("the configured store's evict() failed; see its log")
            if size <= 0:
                return
            moved[0] += size
            moved[1] += 1

    def evict_keys(self, keys: Iterable[str], moved: list[int]) -> None:
        raise SpillFailed(
            "the configured store can only evict its least recently used values; "
            "evict a number of bytes instead"
        )
