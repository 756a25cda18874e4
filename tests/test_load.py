"""A bounded load test: 32 concurrent clients against one daemon whose memory
limit is a quarter of the data they put.

Each client has its own key space and derives every value from (client, key,
version), so it knows what each Get must return without keeping the bytes.
The daemon's RSS is sampled from /proc every 50 ms; its peak must stay within
1.2 x the memory limit plus the daemon's baseline RSS, where the baseline is its
RSS right after start, before any client connected or any data arrived.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from memctl import Client
from memctl.results import KeyInfo, ScopeStatus
from tests.conftest import DATA_PLANE, Daemon, RssSampler

pytestmark = DATA_PLANE

KiB = 1 << 10
MiB = 1 << 20
CLIENTS = 32
#: Chosen so the test takes about a minute on two busy cores.
OPS_PER_CLIENT = 400
MAX_SIZE = 8 * MiB
#: No client may run longer than this; the loop then stops and the test fails.
CLIENT_DEADLINE = 240.0

#: Incompressible bytes values are cut from: 24 MiB made once, sliced per value.
POOL = random.Random(0).randbytes(3 * MAX_SIZE)


def value_for(client: int, key: int, version: int, size: int) -> bytes:
    """The value client ``client`` puts as ``version`` of its key ``key``."""
    seed = hashlib.sha256(f"{client}/{key}/{version}".encode()).digest()
    if size <= len(seed):
        return seed[:size]
    offset = int.from_bytes(seed[:8], "little") % (len(POOL) - MAX_SIZE)
    return seed + POOL[offset + len(seed) : offset + size]


def key_name(client: int, key: int) -> str:
    return f"client-{client:02d}/key-{key:03d}"


def random_size(rng: random.Random) -> int:
    """Skewed small: most values under 256 KiB, one in twenty 2 to 8 MiB."""
    r = rng.random()
    if r < 0.05:
        return 0
    if r < 0.80:
        return rng.randint(1, 256 * KiB)
    if r < 0.95:
        return rng.randint(256 * KiB, 2 * MiB)
    return rng.randint(2 * MiB, MAX_SIZE)


@dataclass(frozen=True)
class Op:
    kind: str  # put | get | evict | delete
    key: int
    size: int = 0


def plan(client: int) -> list[Op]:
    """The client's operations, fixed in advance (so the total put is known).

    Most Puts make a new key (so the live data outgrows the limit and must
    spill), some overwrite one; the other operations pick a key put before,
    which may since have been deleted."""
    rng = random.Random(1000 + client)
    ops: list[Op] = []
    made = 0
    for _ in range(OPS_PER_CLIENT):
        kind = rng.choices(["put", "get", "evict", "delete"], weights=[40, 40, 10, 10])[0]
        if kind == "put" or made == 0:
            if made == 0 or rng.random() < 0.7:
                key, made = made, made + 1
            else:
                key = rng.randrange(made)
            ops.append(Op("put", key, random_size(rng)))
        else:
            ops.append(Op(kind, rng.randrange(made)))
    return ops


@dataclass
class Worker:
    """One client's thread: runs its plan, verifying every answer."""

    index: int
    address: str
    ops: list[Op]
    #: key -> (version, size) of the value that must be there; absent: no value.
    expected: dict[int, tuple[int, int]] = field(default_factory=dict)
    versions: dict[int, int] = field(default_factory=dict)
    done: int = 0
    bytes_put: int = 0
    bytes_got: int = 0
    error: str = ""

    def run(self, deadline: float) -> None:
        try:
            with Client(self.address, timeout=60) as client:
                for op in self.ops:
                    if time.monotonic() > deadline:
                        self.error = f"still running after {CLIENT_DEADLINE} s"
                        return
                    self.step(client, op)
                    self.done += 1
        except BaseException as exc:  # pytest.raises fails with a BaseException
            failed = self.ops[self.done] if self.done < len(self.ops) else None
            what = f"{type(exc).__name__}: {exc}"
            self.error = f"client {self.index} op {self.done} {failed}: {what}"

    def step(self, client: Client, op: Op) -> None:
        name = key_name(self.index, op.key)
        current = self.expected.get(op.key)
        if op.kind == "put":
            version = self.versions.get(op.key, 0) + 1
            self.versions[op.key] = version
            result = client.put(name, value_for(self.index, op.key, version, op.size))
            assert result.size == op.size, result
            self.expected[op.key] = (version, op.size)
            self.bytes_put += op.size
        elif op.kind == "get":
            if current is None:
                with pytest.raises(KeyError):
                    client.get(name)
                return
            data = client.get(name)
            assert len(data) == current[1], f"{name}: {len(data)} bytes, not {current[1]}"
            assert data == value_for(self.index, op.key, *current), f"{name}: wrong bytes"
            self.bytes_got += len(data)
        elif op.kind == "evict":
            if current is None:
                with pytest.raises(KeyError):
                    client.evict([name])
                return
            evicted = client.evict([name])
            assert not evicted.error and evicted.values_moved in (0, 1), evicted
        else:
            assert client.delete([name]) == (0 if current is None else 1), name
            self.expected.pop(op.key, None)


def quiet_snapshot(client: Client) -> tuple[list[KeyInfo], ScopeStatus]:
    """Keys and status, taken once a ListKeys before and after Status agree and
    the managed bytes match the keys in memory (the monitor may still be moving
    values right after the load); the last try if that never happens."""
    deadline = time.monotonic() + 20
    while True:
        before = list(client.list_keys())
        status = client.status().service
        after = list(client.list_keys())
        in_memory = sum(info.size for info in after if info.location == "memory")
        if (before == after and status.managed == in_memory) or time.monotonic() > deadline:
            return after, status
        time.sleep(0.1)


def test_32_clients_mixed_load(spawn: Callable[..., Daemon]) -> None:
    plans = [plan(c) for c in range(CLIENTS)]
    total_put = sum(op.size for ops in plans for op in ops)
    limit = total_put // 4
    daemon = spawn("--memory-limit", str(limit))
    baseline = daemon.rss()
    workers = [Worker(c, daemon.address, plans[c]) for c in range(CLIENTS)]
    started = time.monotonic()
    deadline = started + CLIENT_DEADLINE
    with RssSampler(daemon.pid) as sampler:
        threads = [
            threading.Thread(target=w.run, args=(deadline,), name=f"client-{w.index}")
            for w in workers
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(CLIENT_DEADLINE + 30)
    duration = time.monotonic() - started
    assert not any(thread.is_alive() for thread in threads), "a client thread hung"
    ops = sum(w.done for w in workers)
    summary = (
        f"load: {CLIENTS} clients, {ops} ops, {sum(w.bytes_put for w in workers) / MiB:.0f} MiB "
        f"put, {sum(w.bytes_got for w in workers) / MiB:.0f} MiB got and verified, limit "
        f"{limit / MiB:.0f} MiB, baseline RSS {baseline / MiB:.0f} MiB, peak RSS "
        f"{sampler.peak / MiB:.0f} MiB ({sampler.samples} samples), {duration:.1f} s"
    )
    print(summary)
    errors = [w.error for w in workers if w.error]
    assert not errors, f"{len(errors)} clients failed; first: {errors[0]}\n{summary}"
    assert ops == CLIENTS * OPS_PER_CLIENT
    assert sampler.samples >= 20
    bound = 1.2 * limit + baseline
    assert sampler.peak <= bound, (
        f"peak RSS {sampler.peak / MiB:.0f} MiB > 1.2 x limit + baseline = "
        f"{bound / MiB:.0f} MiB\n{summary}"
    )

    live = {key_name(w.index, key): size for w in workers for key, (_, size) in w.expected.items()}
    with Client(daemon.address) as client:
        keys, status = quiet_snapshot(client)
        assert {info.key: info.size for info in keys} == live
        assert status.keys_in_memory + status.keys_on_disk == len(live)
        in_memory = [info for info in keys if info.location == "memory"]
        assert status.keys_in_memory == len(in_memory)
        assert status.managed == sum(info.size for info in in_memory)
        assert status.managed <= limit
        # The live data outgrew the limit: the daemon spilled.
        assert status.keys_on_disk > 0 and sum(live.values()) > limit
        print(
            f"load: afterwards {len(live)} live keys, {sum(live.values()) / MiB:.0f} MiB; "
            f"{status.keys_in_memory} in RAM ({status.managed / MiB:.0f} MiB), "
            f"{status.keys_on_disk} on disk ({status.spilled / MiB:.0f} MiB spilled)"
        )
    assert daemon.stop() == 0  # and its spill directory is removed
    assert not any(daemon.local_directory.iterdir())
