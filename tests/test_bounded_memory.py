"""The daemon's memory stays bounded whatever clients declare, stall or abandon.

A Put reserves its declared size before data arrives; a value larger than the
scope's target share, or that finds no room in RAM, is streamed into its spill
file and never assembled in RAM. So the daemon's RSS stays under

    baseline + memory limit + 64 MiB

where ``baseline`` is its RSS measured right after start, before any data. These
tests hold it to that with real stalled streams and a real client process that
is stopped and killed mid-Put.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from memctl import Client
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from tests.conftest import DATA_PLANE, Daemon, RssSampler, wait_until
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

MiB = 1 << 20
LIMIT = 256 * MiB
#: Room for the daemon's own heap beyond the limit (gRPC buffers, Python objects).
OVERHEAD = 64 * MiB


def assert_rss_bounded(peak: int, baseline: int, what: str) -> None:
    bound = baseline + LIMIT + OVERHEAD
    assert peak <= bound, (
        f"{what}: daemon RSS peaked at {peak / MiB:.0f} MiB > baseline "
        f"{baseline / MiB:.0f} MiB + limit {LIMIT / MiB:.0f} MiB + {OVERHEAD / MiB:.0f} MiB"
    )


def assert_not_found(stub: pb_grpc.MemctlServiceStub, key: str) -> None:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Get(pb.GetRequest(key=key), timeout=20))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND, (key, info.value.details())


def value_for(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


class StalledPut:
    """A raw Put that sends its header, then nothing until released."""

    def __init__(self, stub: pb_grpc.MemctlServiceStub, key: str, size: int):
        self.key = key
        self.header_sent = threading.Event()
        self.release = threading.Event()
        self.future = stub.Put.future(self._requests(key, size), timeout=120)

    def _requests(self, key: str, size: int) -> Iterator[pb.PutRequest]:
        try:
            yield pb.PutRequest(header=pb.PutHeader(key=key, size=size))
            # gRPC asks for the next message only once the header is on its way.
            self.header_sent.set()
            self.release.wait(120)
        finally:
            self.header_sent.set()


def test_stalled_puts_reserve_nothing_in_ram(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "256MiB")
    baseline = daemon.rss()
    keys = [f"stalled-{i}" for i in range(8)]
    with raw_channel(daemon.address) as channel, Client(daemon.address) as client:
        stub = pb_grpc.MemctlServiceStub(channel)
        stalled = [StalledPut(stub, key, 256 * MiB) for key in keys]
        try:
            for put in stalled:
                assert put.header_sent.wait(30), f"{put.key}: header never sent"
            with RssSampler(daemon.pid) as sampler:
                # A few seconds of stalled streams, while a legitimate client works.
                deadline = time.monotonic() + 4.0
                rounds = 0
                while time.monotonic() < deadline or rounds < 5:
                    small = value_for(rounds, 64 * 1024 + rounds)
                    client.put(f"small-{rounds}", small)
                    assert client.get(f"small-{rounds}") == small
                    rounds += 1
                    assert rounds < 10_000
            assert sampler.samples >= 20
            assert_rss_bounded(sampler.peak, baseline, "8 Puts declaring 256 MiB, stalled")
        finally:
            # Half are cancelled by the client, half end their stream short.
            for i, put in enumerate(stalled):
                if i % 2 == 0:
                    put.future.cancel()
                put.release.set()
        for put in stalled:
            with pytest.raises((grpc.RpcError, grpc.FutureCancelledError)):
                put.future.result(timeout=30)
        for key in keys:
            assert_not_found(stub, key)
        # Reservations were released: the small values are all that is stored.
        status = client.status().service
        assert status.keys_in_memory + status.keys_on_disk == rounds
        assert sorted(info.key for info in client.list_keys()) == sorted(
            f"small-{i}" for i in range(rounds)
        )
        # And the room the stalled Puts reserved is usable again.
        big = value_for(99, 200 * MiB)
        client.put(keys[0], big)
        assert client.get(keys[0]) == big
    assert_rss_bounded(daemon.rss(), baseline, "after a 200 MiB Put")
    assert daemon.stop() == 0


CHILD = """
import sys, random
import grpc
from memctl.auth import call_metadata
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc

address, key, size, seed, before_stall = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
MiB = 1 << 20
data = random.Random(seed).randbytes(size)

def requests():
    yield pb.PutRequest(header=pb.PutHeader(key=key, size=size))
    for start in range(0, size, MiB):
        if start == before_stall:
            print("stalling", flush=True)
            sys.stdin.read()  # until killed
        yield pb.PutRequest(chunk=data[start : start + MiB])

with grpc.insecure_channel(address) as channel:
    stub = pb_grpc.MemctlServiceStub(channel)
    stub.Put(requests(), timeout=120, metadata=call_metadata(address))
print("finished", flush=True)
"""


def spill_bytes(daemon: Daemon) -> int:
    return sum(p.stat().st_size for p in daemon.local_directory.rglob("*") if p.is_file())


def test_killed_client_leaves_nothing_and_memory_bounded(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon = spawn("--memory-limit", "256MiB")
    baseline = daemon.rss()
    size, seed = 200 * MiB, 7
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    child = subprocess.Popen(
        [sys.executable, str(script), daemon.address, "big", str(size), str(seed), str(120 * MiB)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        with RssSampler(daemon.pid) as sampler:
            line = child.stdout.readline()  # the child exits (EOF) if it fails
            assert line == "stalling\n", f"child said {line!r}, exit {child.poll()}"
            os.kill(child.pid, signal.SIGSTOP)
            # Stopped mid-stream: the daemon holds a partial value meanwhile.
            with Client(daemon.address) as client:
                with pytest.raises(KeyError):
                    client.get("big")
                client.put("small", b"s" * 1000)
                assert client.get("small") == b"s" * 1000
            os.kill(child.pid, signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
            with raw_channel(daemon.address) as channel:
                assert_not_found(pb_grpc.MemctlServiceStub(channel), "big")
            # The partial spill file (if the value streamed to disk) is removed.
            wait_until(lambda: spill_bytes(daemon) < MiB, timeout=30)
        assert_rss_bounded(sampler.peak, baseline, "client killed after 120 of 200 MiB")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if child.stdin is not None:
            child.stdin.close()

    data = value_for(seed, size)
    with Client(daemon.address) as client, RssSampler(daemon.pid) as sampler:
        assert client.put("big", data).size == size
        assert client.get("big") == data
        assert client.get("small") == b"s" * 1000
        status = client.status().service
        assert status.keys_in_memory + status.keys_on_disk == 2
    assert_rss_bounded(sampler.peak, baseline, "a full 200 MiB Put and Get")
    assert daemon.stop() == 0


def test_impossible_declared_size_is_refused_at_once(spawn: Callable[..., Daemon]) -> None:
    # The default memory.put-wait is 5 s; a size no room can ever take must not wait.
    # No cap on one value's size: only RAM and disk refuse it.
    daemon = spawn("--memory-limit", "256MiB", "--set", "limits.max-value-size=false")
    with raw_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        put = StalledPut(stub, "enormous", 1 << 50)
        started = time.monotonic()
        try:
            with pytest.raises(grpc.RpcError) as info:
                put.future.result(timeout=30)
        finally:
            put.release.set()
        elapsed = time.monotonic() - started
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert elapsed < 2.5, f"refused only after {elapsed:.1f} s"
        details = error.details()
        assert details and "\n" not in details and "Traceback" not in details, details
        assert "RAM" in details and "disk" in details, details
        assert_not_found(stub, "enormous")
    with Client(daemon.address) as client:  # still serving
        client.put("after", b"a" * MiB)
        assert client.get("after") == b"a" * MiB
