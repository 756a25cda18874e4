"""End to end: a real daemon with a small memory limit spills, and loses nothing."""

from __future__ import annotations

import hashlib
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from memctl import AsyncClient, Client, MemctlMapping
from tests.conftest import DATA_PLANE, Daemon, run_memctl, wait_until
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

MiB = 1 << 20


def value_for(i: int, size: int = 4 * MiB) -> bytes:
    """Deterministic, incompressible test data, so the test need not keep it."""
    return random.Random(i).randbytes(size)


def settles_to_target(client: Client, limit: int) -> None:
    """Managed bytes come down to the target (0.6) soon after an answer: a Put or Get
    answers first, and its scope spills to the target behind the answer."""
    wait_until(lambda: client.status().service.managed <= 0.6 * limit, timeout=10)


def test_three_times_the_limit_spills_and_round_trips(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "64MiB")
    limit = 64 * MiB
    with Client(daemon.address) as client:
        baseline = daemon.rss()
        assert client.status().service.memory_limit == limit
        peak_managed = peak_rss = 0
        for i in range(50):
            client.put(f"value-{i}", value_for(i))
            reading = client.status().service
            peak_managed = max(peak_managed, reading.managed)
            peak_rss = max(peak_rss, daemon.rss())
            assert reading.managed <= limit, f"managed {reading.managed} after put {i}"
            settles_to_target(client, limit)
        status = client.status().service
        assert status.spilled > 0
        assert status.keys_on_disk > 0
        assert status.keys_in_memory + status.keys_on_disk == 50
        assert status.managed + status.unmanaged + status.unmanaged_recent == status.process
        for i in range(50):
            assert client.get(f"value-{i}") == value_for(i), f"value-{i} differs"
            settles_to_target(client, limit)
        peak_rss = max(peak_rss, daemon.rss())
    assert peak_managed > 0  # RAM was used, not bypassed
    assert peak_rss <= baseline + limit, (
        f"daemon RSS peaked at {peak_rss / MiB:.0f} MiB; baseline {baseline / MiB:.0f} MiB "
        f"+ limit {limit / MiB:.0f} MiB"
    )


def test_spill_files_are_private_and_named_by_digest(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "16MiB")
    keys = ["../../etc/passwd", "a/b\x00c", "plain", "ünïcødé/ключ", "k" * 4096]
    with Client(daemon.address) as client:
        for i, key in enumerate(keys):
            client.put(key, value_for(i, 2 * MiB), metadata=f"meta-{i}".encode())
        result = client.evict()  # everything to disk
        assert result.values_moved >= 1 and not result.error
        assert client.status().service.keys_on_disk == len(keys)
        for i, key in enumerate(keys):
            stored = client.get_value(key)
            assert stored.data == value_for(i, 2 * MiB)
            assert stored.metadata == f"meta-{i}".encode()
            assert stored.location == "disk"
    (spill_dir,) = daemon.local_directory.iterdir()
    assert stat.S_IMODE(spill_dir.stat().st_mode) == 0o700
    files = [p for p in spill_dir.rglob("*") if p.is_file()]
    assert files
    for path in files:
        try:
            mode = path.stat().st_mode
        except FileNotFoundError:  # a spill being written (.tmp) finished meanwhile
            continue
        assert stat.S_IMODE(mode) == 0o600
        assert path.resolve().is_relative_to(spill_dir.resolve())
        assert "passwd" not in path.name and "ключ" not in path.name
    assert not Path("/etc/passwd.memctl").exists()
    # A clean exit removes the spill directory.
    assert daemon.stop() == 0
    assert not spill_dir.exists()


def test_value_larger_than_target_goes_straight_to_disk(spawn: Callable[..., Daemon]) -> None:
    # The daemon's own baseline RSS is above 70% of 32 MiB, so the process-driven
    # spill rule would move everything; this test is about the target rule alone.
    daemon = spawn("--memory-limit", "32MiB", "--set", "memory.spill=false")
    with Client(daemon.address) as client:
        small = client.put("small", b"x" * MiB)
        big = client.put("big", value_for(7, 24 * MiB))  # target is 19.2 MiB
        assert small.location == "memory"
        assert big.location == "disk"
        assert client.stat("small").location == "memory"
        assert client.get("big") == value_for(7, 24 * MiB)
        assert client.stat("big").location == "disk"  # too big to come back to RAM


def test_compression_counts_real_bytes_on_disk(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "64MiB", "--set", "memory.spill-compression=lz4")
    with Client(daemon.address) as client:
        client.put("zeros", bytes(8 * MiB))
        client.evict("zeros")
        status = client.status()
        assert status.spill_compression == "lz4"
        assert 0 < status.service.spilled < MiB  # 8 MiB of zeros compress well
        assert client.get("zeros") == bytes(8 * MiB)


@pytest.mark.parametrize("size", [300 * MiB])
def test_large_value_round_trips_through_client_and_cli(
    spawn: Callable[..., Daemon], tmp_path: Path, size: int
) -> None:
    daemon = spawn()
    data = os.urandom(size)
    digest = hashlib.sha256(data).digest()
    with Client(daemon.address, timeout=300) as client:
        assert client.put("big", data).size == size
        assert hashlib.sha256(client.get("big")).digest() == digest
    source = tmp_path / "in.bin"
    source.write_bytes(data)
    del data
    put = run_memctl("put", "--address", daemon.address, "big-cli", str(source))
    assert put.returncode == 0, put.stderr
    target = tmp_path / "out.bin"
    got = run_memctl("get", "--address", daemon.address, "big-cli", "-o", str(target))
    assert got.returncode == 0, got.stderr
    assert target.stat().st_size == size
    assert hashlib.sha256(target.read_bytes()).digest() == digest


def test_async_client_and_mapping(daemon: Daemon) -> None:
    import asyncio

    async def main() -> None:
        async with AsyncClient(daemon.address) as client:
            await client.put("a", b"1" * (3 * MiB + 5), metadata=b"hdr")
            stored = await client.get_value("a")
            assert stored.data == b"1" * (3 * MiB + 5) and stored.metadata == b"hdr"
            assert [k.key async for k in client.list_keys()] == ["a"]
            assert await client.delete(["a", "missing"]) == 1
            with pytest.raises(KeyError):
                await client.get("a")

    asyncio.run(main())

    with Client(daemon.address) as client:
        mapping = MemctlMapping(client)
        mapping["x"] = b"one"
        mapping["y"] = b"two"
        assert mapping["x"] == b"one"
        assert "x" in mapping and "z" not in mapping
        assert sorted(mapping) == ["x", "y"]
        assert len(mapping) == 2
        del mapping["x"]
        with pytest.raises(KeyError):
            del mapping["x"]
        assert dict(mapping.items()) == {"y": b"two"}


def test_list_keys_pages_and_prefix(daemon: Daemon) -> None:

    from memctl.v1 import memctl_pb2 as pb
    from memctl.v1 import memctl_pb2_grpc as pb_grpc

    with Client(daemon.address) as client:
        for key in ("b/2", "a/1", "b/1", "c", "b/3"):
            client.put(key, key.encode())
        assert [i.key for i in client.list_keys()] == ["a/1", "b/1", "b/2", "b/3", "c"]
        assert [i.key for i in client.list_keys("b/")] == ["b/1", "b/2", "b/3"]
    with raw_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        pages, token = [], ""
        while True:
            page = stub.ListKeys(pb.ListKeysRequest(page_size=2, page_token=token), timeout=10)
            pages.append([info.key for info in page.keys])
            token = page.next_page_token
            if not token:
                break
    assert pages == [["a/1", "b/1"], ["b/2", "b/3"], ["c"]]


def test_mapping_of_an_attached_worker_sees_its_own_scope(daemon: Daemon) -> None:
    with Client(daemon.address) as service_client:
        service_client.put("service-key", b"s")
        with Client(daemon.address) as worker, worker.attach("w"):
            mapping = MemctlMapping(worker)
            mapping["a"] = b"1"
            mapping["b"] = b"2"
            assert len(mapping) == 2 and sorted(mapping) == ["a", "b"]
            assert "service-key" not in mapping
        assert len(MemctlMapping(service_client)) == 1


def test_every_spill_is_an_event_whoever_caused_it(spawn: Callable[..., Daemon]) -> None:
    """Put pushing LRU values out, Put going straight to disk, Evict: each an event with
    bytes, values, reason and readings (the monitor's own spills are tested elsewhere).
    Spill and pause are off so that only the calls below move values."""
    daemon = spawn(
        "--memory-limit", "100MiB", "--set", "memory.spill=false", "--set", "memory.pause=false"
    )
    with Client(daemon.address) as client:
        client.put("a", value_for(1, 30 * MiB))
        client.put("b", value_for(2, 20 * MiB))
        client.put("c", value_for(3, 20 * MiB))  # 70 MiB > target 60 MiB: a spills
        client.put("huge", value_for(4, 70 * MiB))  # over the target share: straight to disk
        client.evict(["b"])
        spills = [e for e in client.events() if e.kind == "spill"]
    reasons = [e.reason for e in spills]
    assert len(spills) == 3, reasons
    pushed, straight, evicted = spills
    assert "Put of 'c'" in pushed.reason and "over its target" in pushed.reason
    assert pushed.details == {"bytes": str(30 * MiB), "values": "1"}
    assert "Put of 'huge'" in straight.reason and "straight to disk" in straight.reason
    assert straight.details == {"bytes": str(70 * MiB), "values": "1"}
    assert "Evict" in evicted.reason and evicted.details["values"] == "1"
    for event in spills:
        assert event.readings is not None and event.readings["process"] > 0
