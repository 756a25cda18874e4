"""A full disk: Puts fail cleanly with RESOURCE_EXHAUSTED, nothing acknowledged is
lost, room comes back after deletes, and a waiting Put gets in when room appears.

The spill directory is on a real 64 MiB tmpfs (mounted by the test; it needs
root) and spill compression is off, so random bytes fill it byte for byte.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from memctl import Client
from memctl.errors import MemctlError, ResourceExhausted
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from tests.conftest import DATA_PLANE, Daemon
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

KiB = 1 << 10
MiB = 1 << 20
FS_SIZE = 64 * MiB


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs, unmounted (lazily if still busy) at teardown.

    Requested before ``spawn``, so its daemons are stopped before the unmount.
    """
    mount_point = tmp_path / "small-fs"
    mount_point.mkdir()
    options = f"size={FS_SIZE // MiB}m,mode=0700"
    try:
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount_point
    finally:
        umount = subprocess.run(
            ["umount", str(mount_point)], capture_output=True, timeout=30, check=False
        )
        if umount.returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], timeout=30, check=False)


def spawn_on(spawn: Callable[..., Daemon], fs: Path, put_wait: str) -> Daemon:
    return spawn(
        "--memory-limit",
        "96MiB",
        "--local-directory",
        str(fs),
        "--set",
        "memory.spill-compression=false",
        "--set",
        f"memory.put-wait={put_wait}",
    )


def digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def assert_helpful(error: ResourceExhausted) -> None:
    message = str(error)
    assert message and "\n" not in message and "Traceback" not in message, message
    assert re.search(r"delete|raise|free|retry|later", message), message


def fill(
    client: Client,
    rng: random.Random,
    stored: dict[str, tuple[int, bytes]],
    prefix: str,
    sizes: Callable[[], int],
    put_wait: float,
    stop_after_failures: int,
) -> int:
    """Put random values until ``stop_after_failures`` Puts in a row fail; returns
    the number of failed Puts. Each Put succeeds or raises ResourceExhausted."""
    failures = in_a_row = 0
    deadline = time.monotonic() + 60
    for i in range(400):
        if in_a_row >= stop_after_failures:
            break
        assert time.monotonic() < deadline, f"still filling after 60 s, {len(stored)} stored"
        key = f"{prefix}-{i}"
        data = os.urandom(sizes())
        started = time.monotonic()
        try:
            client.put(key, data)
        except ResourceExhausted as exc:
            elapsed = time.monotonic() - started
            assert elapsed < put_wait + 10, f"Put of {key} failed only after {elapsed:.1f} s"
            assert_helpful(exc)
            with pytest.raises(KeyError):
                client.get(key)
            failures += 1
            in_a_row += 1
        except MemctlError as exc:
            pytest.fail(f"Put of {key} ({len(data)} bytes) raised {type(exc).__name__}: {exc}")
        else:
            stored[key] = (len(data), digest(data))
            in_a_row = 0
    else:
        pytest.fail(f"400 Puts and not {stop_after_failures} failures in a row")
    return failures


def assert_all_read_back(client: Client, stored: dict[str, tuple[int, bytes]]) -> None:
    for key, (size, expected) in stored.items():
        data = client.get(key)
        assert len(data) == size and digest(data) == expected, f"{key} differs"


def assert_counts(client: Client, stored: dict[str, tuple[int, bytes]]) -> None:
    status = client.status().service
    assert status.keys_in_memory + status.keys_on_disk == len(stored)
    assert sorted(info.key for info in client.list_keys()) == sorted(stored)


def log_uniform_size(rng: random.Random) -> Callable[[], int]:
    return lambda: int(2 ** rng.uniform(16, 23))  # 64 KiB to 8 MiB


def test_full_disk_refuses_cleanly_and_recovers(
    small_fs: Path, spawn: Callable[..., Daemon]
) -> None:
    daemon = spawn_on(spawn, small_fs, "1s")
    rng = random.Random(20261130)
    stored: dict[str, tuple[int, bytes]] = {}
    with Client(daemon.address, timeout=30) as client:
        failures = fill(client, rng, stored, "v", log_uniform_size(rng), 1.0, 3)
        assert failures >= 3
        total = sum(size for size, _ in stored.values())
        # More than RAM's share was taken, so the disk was used, and it is full-ish.
        assert total > 64 * MiB, f"only {total / MiB:.0f} MiB stored"
        used = FS_SIZE - shutil.disk_usage(small_fs).free
        assert used > FS_SIZE // 2, f"only {used / MiB:.0f} MiB of the tmpfs used"
        assert_all_read_back(client, stored)
        assert_counts(client, stored)

        # Delete every other value: Puts succeed again.
        doomed = sorted(stored)[::2]
        assert client.delete(doomed) == len(doomed)
        for key in doomed:
            del stored[key]
        for i in range(8):
            data = os.urandom(int(2 ** rng.uniform(16, 22)))  # up to 4 MiB
            client.put(f"again-{i}", data)
            stored[f"again-{i}"] = (len(data), digest(data))
        assert_all_read_back(client, stored)
        assert_counts(client, stored)
        assert client.status().service.name == "service"
    assert daemon.process.poll() is None, "the daemon died"


def test_waiting_put_gets_in_when_another_client_deletes(
    small_fs: Path, spawn: Callable[..., Daemon]
) -> None:
    # memory.put-wait 5 s here (1 s above): the waiting Put must still be waiting
    # when the delete lands, even on a loaded two-core machine.
    daemon = spawn_on(spawn, small_fs, "5s")
    rng = random.Random(7)
    stored: dict[str, tuple[int, bytes]] = {}
    size = 2 * MiB
    with Client(daemon.address, timeout=30) as client:
        fill(client, rng, stored, "fill", lambda: size, 5.0, 1)
        assert sum(s for s, _ in stored.values()) > 64 * MiB

        data = os.urandom(size)
        header_sent = threading.Event()

        def requests() -> Iterator[pb.PutRequest]:
            yield pb.PutRequest(header=pb.PutHeader(key="waiting", size=size))
            header_sent.set()
            for start in range(0, size, MiB):
                yield pb.PutRequest(chunk=data[start : start + MiB])

        with raw_channel(daemon.address) as channel:
            stub = pb_grpc.MemctlServiceStub(channel)
            started = time.monotonic()
            future = stub.Put.future(requests(), timeout=30)
            finished = threading.Event()
            future.add_done_callback(lambda _: finished.set())
            assert header_sent.wait(20)
            # Still no room: the Put waits (it neither fails nor completes).
            assert not finished.wait(1.0), f"Put ended without room: {future.exception()}"
            with Client(daemon.address, timeout=30) as other:
                by_location: dict[str, list[str]] = {"memory": [], "disk": []}
                for info in other.list_keys("fill-"):
                    by_location.setdefault(info.location, []).append(info.key)
                doomed = by_location["memory"][:3] + by_location["disk"][:3]
                assert len(doomed) >= 3, by_location
                assert other.delete(doomed) == len(doomed)
            response = future.result(timeout=30)
            elapsed = time.monotonic() - started
        assert response.size == size, response
        assert elapsed < 5.0 + 5.0, f"the waiting Put took {elapsed:.1f} s"
        for key in doomed:
            del stored[key]
        stored["waiting"] = (size, digest(data))
        assert client.get("waiting") == data
        assert_all_read_back(client, stored)
        assert_counts(client, stored)
