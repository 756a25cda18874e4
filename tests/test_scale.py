"""Many small keys: what each costs, and readings that never walk them.

Status, the metrics and the monitor's tick read the counters each scope publishes
after every store operation (``StoreSizes``), so they cost the same with a million
keys as with ten. Here the key dicts fail the test if a reading so much as looks at
them, and the work a reading does is counted with few keys and with many. Nothing
is timed.
"""

from __future__ import annotations

import asyncio
import random
import sys
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn

import pytest

from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.control import ControlPlane
from memctl_server.core import MemoryService, ServiceSettings
from memctl_server.engine import EngineSettings, Thresholds
from memctl_server.monitor import Monitor
from memctl_server.scopes import KeyInfo, Scope
from memctl_server.spillfile import checksum
from memctl_server.store import SpillBuffer
from tests.inprocess import serving

MANY = 5000


class Untouchable(dict[str, Any]):
    """A key dict that fails the test when anything reads it."""

    def _touched(self) -> NoReturn:
        raise AssertionError("a reading touched the keys")

    def __iter__(self) -> NoReturn:
        self._touched()

    def __len__(self) -> NoReturn:
        self._touched()

    def __contains__(self, key: object) -> NoReturn:
        self._touched()

    def __getitem__(self, key: str) -> NoReturn:
        self._touched()

    def get(self, *args: Any) -> NoReturn:
        self._touched()

    def keys(self) -> NoReturn:
        self._touched()

    def values(self) -> NoReturn:
        self._touched()

    def items(self) -> NoReturn:
        self._touched()


def put_small(scope: Scope, keys: range) -> None:
    """Puts of 16-byte values, as a Put hands them to the store (store thread)."""
    for i in keys:
        data = bytearray(i.to_bytes(16, "little"))
        scope.put(f"k{i:07d}", data, checksum(data), b"")


def settings(tmp_path: Path) -> ServiceSettings:
    return ServiceSettings(
        memory_limit=1 << 30,
        total_memory=4 << 30,
        thresholds=Thresholds(),
        spill_directory=tmp_path,
        max_spill=False,
        compression="none",
        monitor_interval=0.1,
        recent_to_old_time=30.0,
    )


@pytest.fixture
def core(tmp_path: Path) -> Iterator[MemoryService]:
    service = MemoryService(settings(tmp_path))
    yield service
    service.close()


def test_readings_never_touch_the_keys(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as (server, channel):
            core = server.core
            scope = core.service_scope
            store = scope.data
            assert isinstance(store, SpillBuffer)
            await core._on_store_thread(put_small, scope, range(MANY))
            await core.evict(
                scope, keys=[f"k{i:07d}" for i in range(10)], nbytes=0, everything=False
            )
            fast, files = store.fast.d, store.slow.files
            store.fast.d, store.slow.files = Untouchable(fast), Untouchable(files)
            try:
                status = await pb_grpc.MemctlServiceStub(channel).Status(
                    pb.StatusRequest(), timeout=10
                )
                core.snapshot()
                core.snapshot(record=True)
                monitor = Monitor(core, server.control, core.events, EngineSettings(), 0.1)
                await monitor.tick()
            finally:
                store.fast.d, store.slow.files = fast, files
            service = status.scopes[0]
            assert (service.keys_in_memory, service.keys_on_disk) == (MANY - 10, 10)

    asyncio.run(main())


def calls_in_memctl(func: Any) -> int:
    """Python calls made in memctl's own code while ``func`` runs."""
    count = 0

    def profile(frame: FrameType, event: str, _arg: object) -> None:
        nonlocal count
        if event == "call" and "memctl_server" in frame.f_code.co_filename:
            count += 1

    sys.setprofile(profile)
    try:
        func()
    finally:
        sys.setprofile(None)
    return count


def test_readings_do_the_same_work_with_ten_keys_as_with_many(core: MemoryService) -> None:
    scope = core.service_scope
    control = ControlPlane(core, heartbeat_interval=1.0, heartbeat_timeout=3.0, retention=60.0)
    monitor = Monitor(core, control, core.events, EngineSettings(), 0.1)

    def readings() -> list[int]:
        return [
            calls_in_memctl(core.snapshot),
            calls_in_memctl(lambda: core.snapshot(record=True)),
            calls_in_memctl(lambda: asyncio.run(monitor.tick())),
        ]

    core._store_thread.submit(put_small, scope, range(10)).result()
    readings()  # first calls import and cache what later ones reuse
    few = readings()
    core._store_thread.submit(put_small, scope, range(10, 10 + MANY)).result()
    assert readings() == few


def test_a_small_key_costs_under_200_bytes(core: MemoryService) -> None:
    """The whole of it: key, value, checksum, metadata and the store's bookkeeping
    (tracemalloc's bytes, before the allocator rounds them)."""
    scope = core.service_scope
    keys = 20_000
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        core._store_thread.submit(put_small, scope, range(keys)).result()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / keys
    finally:
        tracemalloc.stop()
    assert scope.sizes.keys_in_memory == keys
    assert per_key < 200, f"{per_key:.0f} bytes a key"


def test_pages_follow_the_keys_as_they_change(core: MemoryService) -> None:
    """ListKeys keeps its sorted keys between pages; every page must still be what
    sorting the keys stored at that moment gives."""
    scope = core.service_scope
    rng = random.Random(7)
    stored: dict[str, KeyInfo] = {}
    names = [f"{rng.choice('abc')}/{rng.randrange(300):03d}" for _ in range(400)]

    def expected(prefix: str, after: str, limit: int) -> list[KeyInfo]:
        keys = sorted(k for k in stored if k.startswith(prefix) and k > after)
        return [stored[k] for k in keys[:limit]]

    for step in range(3000):
        key = rng.choice(names)
        action = rng.random()
        if action < 0.45:
            data, metadata = key.encode() * rng.randrange(1, 4), b"m" * rng.randrange(3)
            scope.put(key, data, checksum(data), metadata)
            stored[key] = KeyInfo(key, len(data), "memory", len(metadata))
        elif action < 0.8:
            scope.delete([key])
            stored.pop(key, None)
        else:
            prefix = rng.choice(["", "a/", "b/0", "c/1", "d"])
            after = rng.choice(["", key, key[:3]])
            limit = rng.randrange(1, 50)
            assert scope.list_keys(prefix, after, limit) == expected(prefix, after, limit), step
