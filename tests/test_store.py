"""The spill store on a real directory: LRU order, size accounting, spill errors."""

from __future__ import annotations

import logging
import math
import os
import stat
from pathlib import Path

import pytest

from memctl_server.readings import MemoryReadings, UnmanagedHistory
from memctl_server.spillfile import Record, checksum, header_length
from memctl_server.store import ManualEvictProto, SpillBudget, SpillBuffer, resolve_compression


def make(
    tmp_path: Path, target: float = 100, max_spill: int | bool = False, compression: str = "none"
) -> SpillBuffer:
    budget = SpillBudget(max_spill if max_spill is not True else False)
    (tmp_path / "spill").mkdir(exist_ok=True)
    return SpillBuffer(
        tmp_path / "spill" / "scope",
        target,
        budget=budget,
        compression=resolve_compression(compression),
        scope="service",
    )


def rec(data: bytes) -> Record:
    return Record(data, checksum(data), b"")


def on_disk(key: str, body: int) -> int:
    """Bytes a spill file of ``body`` raw bytes takes for ``key``."""
    return header_length("service", key, b"", body) + body


def test_lru_order_decides_what_spills(tmp_path: Path) -> None:
    store = make(tmp_path)
    store["a"] = rec(b"a" * 40)
    store["b"] = rec(b"b" * 40)
    assert store["a"].data == b"a" * 40  # a is now the most recently used
    store["c"] = rec(b"c" * 40)  # 120 > 100: the LRU value, b, spills
    assert set(store.fast) == {"a", "c"}
    assert set(store.slow) == {"b"}
    assert store.managed == 80
    assert store.spilled == on_disk("b", 40)  # header + 40 raw bytes, really on disk
    assert sum(p.stat().st_size for p in store.directory.iterdir()) == store.spilled


def test_sizes_are_tracked_through_every_move(tmp_path: Path) -> None:
    store = make(tmp_path)
    for i in range(10):
        store[f"k{i}"] = rec(bytes(30))
    assert store.managed == sum(store.entry(k).size for k in store.fast) <= 100
    assert store.spilled == sum(on_disk(k, 30) for k in store.slow)
    assert bytes(store["k0"].data) == bytes(30)  # read back: returns to RAM
    assert "k0" in store.fast
    store["k0"] = rec(bytes(5))  # overwrite
    assert store.managed == sum(store.entry(k).size for k in store.fast)
    for key in list(store):
        del store[key]
    assert store.managed == 0 and store.spilled == 0
    assert not list(store.directory.iterdir())


def test_heavy_value_goes_straight_to_disk_and_stays(tmp_path: Path) -> None:
    store = make(tmp_path)
    store["small"] = rec(b"s")
    store["heavy"] = rec(b"h" * 150)
    assert store.location("heavy") == "disk" and store.location("small") == "memory"
    assert bytes(store["heavy"].data) == b"h" * 150
    assert store.location("heavy") == "disk"


def test_evict_protocol(tmp_path: Path) -> None:
    store = make(tmp_path, target=math.inf)
    assert isinstance(store, ManualEvictProto)
    assert store.evict() == -1  # nothing to evict: -1, never raises
    store["a"] = rec(b"a" * 10)
    store["b"] = rec(b"b" * 20)
    assert store.evict() == 10  # least recently used first
    moved = [0, 0]
    store.evict_bytes(1, moved)
    assert moved == [20, 1]
    assert not store.fast and set(store.slow) == {"a", "b"}


def test_max_spill_keeps_values_in_ram(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    max_spill = on_disk("k0", 40) + 10  # room for one value on disk
    store = make(tmp_path, target=50, max_spill=max_spill)
    with caplog.at_level(logging.WARNING):
        for i in range(5):
            store[f"k{i}"] = rec(bytes([i]) * 40)
    assert len(store) == 5
    assert 0 < store.spilled <= max_spill
    for i in range(5):
        assert bytes(store[f"k{i}"].data) == bytes([i]) * 40
    assert store.evict() == -1 or store.spilled <= max_spill
    warnings = [r for r in caplog.records if "Spill to disk failed" in r.getMessage()]
    assert len(warnings) == 1  # once per burst, not once per value
    assert "raise memory.max-spill" in warnings[0].getMessage()


def test_unwritable_directory_keeps_values_in_ram(tmp_path: Path) -> None:
    store = make(tmp_path, target=50)
    if os.geteuid() == 0:
        # root ignores permission bits; a full "disk" is simulated with a file in
        # the directory's place, which fails every write with a real OSError.
        store.directory.write_bytes(b"")
    else:
        (tmp_path / "spill").chmod(stat.S_IRUSR | stat.S_IXUSR)
    for i in range(4):
        store[f"k{i}"] = rec(bytes([i]) * 40)
    assert store.spilled == 0 and store.managed == 160
    assert all(bytes(store[f"k{i}"].data) == bytes([i]) * 40 for i in range(4))
    assert store.evict() == -1


def test_spill_files_are_private(tmp_path: Path) -> None:
    store = make(tmp_path, target=10)
    store["../../etc/passwd"] = rec(b"x" * 20)
    (path,) = store.directory.iterdir()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(store.directory.stat().st_mode) == 0o700
    assert "passwd" not in path.name


@pytest.mark.parametrize("kind", ["lz4", "zlib", "none"])
def test_compression_round_trips_and_skips_incompressible(tmp_path: Path, kind: str) -> None:
    store = make(tmp_path, target=0, compression=kind)
    zeros, noise = bytes(100_000), os.urandom(100_000)
    for key, value in (("zeros", zeros), ("noise", noise), ("empty", b"")):
        store[key] = rec(value)
        assert store.location(key) == ("disk" if value else "memory")  # b"" weighs nothing
        assert bytes(store[key].data) == value
    zeros_size = store.slow.files["zeros"].disk_size
    assert zeros_size < 10_000 if kind != "none" else zeros_size == on_disk("zeros", 100_000)
    assert store.slow.files["noise"].disk_size == on_disk("noise", 100_000)  # stored raw


def test_auto_compression_is_lz4_when_installed() -> None:
    assert resolve_compression("auto") == "lz4"
    with pytest.raises(ValueError, match="use auto, lz4, zlib or none"):
        resolve_compression("snappy")


def test_readings_add_up_by_construction() -> None:
    r = MemoryReadings.of(process=100, managed=30, unmanaged_old=50, spilled=7)
    assert (r.managed, r.unmanaged, r.unmanaged_recent) == (30, 50, 20)
    assert r.managed + r.unmanaged + r.unmanaged_recent == r.process
    # A racy RSS sample below managed is clamped, and the sum still holds.
    r = MemoryReadings.of(process=10, managed=30, unmanaged_old=50, spilled=0)
    assert (r.process, r.unmanaged, r.unmanaged_recent) == (30, 0, 0)


def test_unmanaged_old_is_the_minimum_over_the_window() -> None:
    history = UnmanagedHistory(window=30)
    assert history.old(90) == 90  # no samples yet: the current one
    history.add(0, 100)
    history.add(10, 40)
    history.add(20, 80)
    assert history.old(90) == 40
    assert history.old(30) == 30  # the current sample counts
    history.add(41, 90)  # the 40 is older than 30 s now
    assert history.old(100) == 80
    history.add(100, 70)  # nothing else left in the window
    assert history.old(90) == 70
