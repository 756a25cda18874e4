"""Restart without loss (``persist: true``): real daemons stopped and started again on
the same local directory serve every value byte-identical, worker scopes included."""

from __future__ import annotations

import random
import re
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from memctl import Client
from tests.conftest import DATA_PLANE, Daemon

pytestmark = DATA_PLANE

KiB = 1 << 10


def value_for(i: int) -> bytes:
    rng = random.Random(i)
    return rng.randbytes(rng.randrange(0, 64 * KiB))


def start(spawn: Callable[..., Daemon], local: Path) -> Daemon:
    return spawn("--local-directory", str(local), "--memory-limit", "1GiB", "--set", "persist=true")


def fill(client: Client, keys: range, prefix: str = "v") -> dict[str, bytes]:
    values = {f"{prefix}-{i}": value_for(i) for i in keys}
    for key, value in values.items():
        client.put(key, value, metadata=key.encode())
    return values


def test_sigterm_writes_everything_and_the_next_start_serves_it(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    local = tmp_path / "data"
    first = start(spawn, local)
    with Client(first.address) as client:
        service = fill(client, range(150))
        client.evict([f"v-{i}" for i in range(0, 150, 2)])  # half on disk, half in RAM
        status = client.status().service
        assert status.keys_on_disk >= 75 and status.keys_in_memory >= 1
        client.put("v-0", b"overwritten after it was spilled", metadata=b"v-0")
        service["v-0"] = b"overwritten after it was spilled"
        client.delete(["v-1"])
        del service["v-1"]
    with Client(first.address) as worker_client, worker_client.attach("worker-a") as session:
        worker = fill(worker_client, range(150, 200), prefix="w")
        secret = session.resume_secret
    assert first.stop(signal.SIGTERM) == 0

    second = start(spawn, local)
    assert re.search(r"Restored 199 values .* in 2 scopes", second.log()), second.log()
    assert "lost" not in second.log()
    with Client(second.address) as client:
        for key, value in service.items():
            stored = client.get_value(key)
            assert stored.data == value and stored.metadata == key.encode(), key
        with pytest.raises(KeyError):
            client.get("v-1")
        scopes = {s.name: s for s in client.status().scopes}
        assert scopes["worker-a"].state == "detached"
    with (
        Client(second.address) as worker_client,
        worker_client.attach("worker-a", resume_secret=secret) as session,
    ):
        assert session.keys_kept == 50
        for key, value in worker.items():
            assert worker_client.get(key) == value, key


def test_after_sigkill_what_reached_disk_is_served_and_the_rest_counted(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    local = tmp_path / "data"
    first = start(spawn, local)
    with Client(first.address) as client:
        values = fill(client, range(60))
        client.evict([f"v-{i}" for i in range(40)])  # 40 on disk, 20 only in RAM
        client.delete(["v-0"])  # deleted: neither served nor lost
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL

    second = start(spawn, local)
    log = second.log()
    assert re.search(r"Restored 39 values", log), log
    assert re.search(r"20 values were lost: 20 were only in RAM", log), log
    with Client(second.address) as client:
        for i in range(1, 40):
            assert client.get(f"v-{i}") == values[f"v-{i}"]
        for i in (0, *range(40, 60)):
            with pytest.raises(KeyError):
                client.get(f"v-{i}")
        # The restarted daemon journals afresh: a clean stop now loses nothing.
        client.put("new", b"after the restart")
    assert second.stop(signal.SIGTERM) == 0
    third = start(spawn, local)
    assert re.search(r"Restored 40 values", third.log()), third.log()
    assert "were lost" not in third.log()


def test_without_persist_nothing_is_kept(spawn: Callable[..., Daemon], tmp_path: Path) -> None:
    local = tmp_path / "data"
    first = spawn("--local-directory", str(local))
    with Client(first.address) as client:
        client.put("k", b"v")
        client.evict()
    assert first.stop() == 0
    assert not list(local.iterdir())  # the private spill directory is gone
    second = spawn("--local-directory", str(local))
    with Client(second.address) as client, pytest.raises(KeyError):
        client.get("k")
