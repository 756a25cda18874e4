"""User-supplied stores for the pluggable-store tests (``store.factory``)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, MutableMapping


def plain_dict() -> dict[str, bytes]:
    """A store without evict(): target and spill must turn off."""
    return {}


class TwoTierDict(MutableMapping[str, bytes]):
    """A store with Dask's ManualEvictProto: ``fast`` (LRU order) and ``evict()``."""

    def __init__(self, label: str = ""):
        self.label = label
        self.fast: OrderedDict[str, bytes] = OrderedDict()
        self.slow: dict[str, bytes] = {}

    def evict(self) -> int:
        if not self.fast:
            return -1
        key, value = self.fast.popitem(last=False)
        self.slow[key] = value
        return len(value)

    def __getitem__(self, key: str) -> bytes:
        if key in self.fast:
            self.fast.move_to_end(key)
            return self.fast[key]
        return self.slow[key]

    def __setitem__(self, key: str, value: bytes) -> None:
        self.slow.pop(key, None)
        self.fast[key] = value
        self.fast.move_to_end(key)

    def __delitem__(self, key: str) -> None:
        if key in self.fast:
            del self.fast[key]
        else:
            del self.slow[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.fast
        yield from self.slow

    def __len__(self) -> int:
        return len(self.fast) + len(self.slow)


def two_tier(label: str) -> TwoTierDict:
    if label != "from-config":
        raise ValueError("store.kwargs did not arrive")
    return TwoTierDict(label)


class HeldEvictDict(TwoTierDict):
    """A store whose evict() holds the store thread until ``RELEASE`` is set: a spill
    that lasts as long as a test needs (the daemon runs in the test's process)."""

    #: Set once an evict() has started.
    EVICTING = threading.Event()
    RELEASE = threading.Event()
    #: evict() calls so far.
    calls = 0

    def evict(self) -> int:
        HeldEvictDict.calls += 1
        self.EVICTING.set()
        self.RELEASE.wait(60)
        return super().evict()


def held_evict() -> HeldEvictDict:
    return HeldEvictDict()
