"""Workload 8: the same-host channel (``transport="same-host"``): the daemon's unix
socket, small values in frames, values of 1 MiB or more as sealed memfds.

Every row's workload starts "same-host:", and every memctl client here is forced onto
the channel (an error, not a quiet fall back to gRPC, if the daemon has none). The
peers run in this process, as in ``data_plane``: Redis through redis-py, and a copy
into a buffer whose pages are already faulted in. Each row carries the goal it is
judged against (``Row.target``: the ratio to reach; ``target_max``: not to pass):

- one client, 1 KiB Put and Get one after another: ops/s at least Redis's (1x), p99
  no worse than Redis's (1x); p50 shown beside Redis's without a goal;
- 32 threads, each with a client of its own (so 32 connections, as the threads of
  ``data_plane`` get from the 32-connection pool of the redis-py client they share):
  ops/s at least 1.5x Redis's. The goal is for 32 concurrent clients; one memctl
  client shared by the 32 threads multiplexes them all over one connection, which
  redis-py never does (and which measured 0.6-0.8x the rate of a client each when
  this was written; ``memctl_threads(..., shared=True)`` measures it);
- a 256 MiB Put (quick: 32 MiB): at least 3x Redis's MiB/s and half a memory copy's;
- a Get of it as bytes: at least half a memory copy's MiB/s; as a view
  (``get_view``, the daemon's segment mapped, no byte copied): under 5 ms whatever the
  size, shown for 16, 64 and 256 MiB (quick: 4, 16, 32), both for the first Get after
  the Put and for the median of later ones;
- 2 GiB put in 64 MiB values (quick: 256 MiB) into a daemon limited to 8 GiB: its
  memory (RssAnon + RssFile from /proc/PID/status, plus the bytes of the memfds it
  holds, which its RSS leaves out until they are touched) within 5% of managed bytes
  plus its own memory before the run; and its own reading of itself ("process" in
  Status) within 5% of that measure.
"""

from __future__ import annotations

import mmap
import os
import statistics
import time
from pathlib import Path

from memctl import Client

from .data_plane import (
    ROOMY_LIMIT,
    _memory_copy,
    _redis_threads,
    expect,
    sequential_put_get,
    size_text,
)
from .peers import Lab, MemctlDaemon
from .report import Row
from .timing import GIB, KIB, MIB, Sample, payload, run_threads

SAME_HOST = "same-host"
PREFIX = "same-host: "
THREADS = 32
#: The issue's goals (ratios, memctl against the peer; above 1 is better).
SINGLE_OPS_TARGET = 1.0
SINGLE_P99_TARGET = 1.0
CONCURRENT_OPS_TARGET = 1.5
LARGE_PUT_REDIS_TARGET = 3.0
LARGE_COPY_TARGET = 0.5
VIEW_TARGET_MS = 5.0
ACCOUNTING_TOLERANCE = 0.05
#: The accounting run's daemon: room for all of it in RAM (the machine has ~23 GiB).
ACCOUNTING_LIMIT = "8 GiB"
ACCOUNTING_VALUE = 64 * MIB
#: ``get_view`` calls timed after the first, per size.
VIEW_REPEATS = 10


def run_same_host(quick: bool, lab: Lab) -> list[Row]:
    rows = _small(quick, lab)
    rows += _large(quick, lab)
    rows += _accounting(quick, lab)
    return rows


# --- 1 KiB values: one client, then 32 threads ------------------------------------------
def _small(quick: bool, lab: Lab) -> list[Row]:
    seconds = 0.4 if quick else 3.0
    threaded = 0.25 if quick else 2.0
    value = payload(KIB)
    server = lab.get_redis()
    server.flush()
    with lab.memctl(ROOMY_LIMIT) as daemon:
        with daemon.client(transport=SAME_HOST) as client:
            m_put, m_get = sequential_put_get(client.put, client.get, value, seconds)
        mt_put, mt_get = memctl_threads(daemon, THREADS, threaded, value, shared=False)
    redis = server.client()
    try:
        r_put, r_get = sequential_put_get(redis.set, redis.get, value, seconds)
    finally:
        redis.close()
    server.flush()
    rt_put, rt_get = _redis_threads(server, THREADS, threaded, value)

    rows: list[Row] = []
    for verb, m, r in (("put", m_put, r_put), ("get", m_get, r_get)):
        label = f"{PREFIX}{verb} 1 KiB, 1 client"
        rows += [
            Row(label, "ops/s", m.ops_per_second, r.ops_per_second, "redis",
                target=SINGLE_OPS_TARGET),
            Row(label, "p50 ms", m.latency_ms(50), r.latency_ms(50), "redis",
                higher_is_better=False),
            Row(label, "p99 ms", m.latency_ms(99), r.latency_ms(99), "redis",
                higher_is_better=False, target=SINGLE_P99_TARGET),
        ]  # fmt: skip
    for verb, m, r in (("put", mt_put, rt_put), ("get", mt_get, rt_get)):
        label = f"{PREFIX}{verb} 1 KiB, {THREADS} threads, a client each"
        rows += [
            Row(label, "ops/s", m.ops_per_second, r.ops_per_second, "redis",
                target=CONCURRENT_OPS_TARGET),
            Row(label, "p99 ms", m.latency_ms(99), r.latency_ms(99), "redis",
                higher_is_better=False),
        ]  # fmt: skip
    return rows


def memctl_threads(
    daemon: MemctlDaemon, n: int, seconds: float, value: bytes, *, shared: bool
) -> tuple[Sample, Sample]:
    """``n`` threads putting 1 KiB values for ``seconds``, then reading back what each
    put: through one client they share (``shared``), else a client (and so a
    connection) each."""
    clients = [daemon.client(transport=SAME_HOST) for _ in range(1 if shared else n)]
    try:

        def client(w: int) -> Client:
            return clients[0] if shared else clients[w]

        puts = run_threads(lambda w, i: client(w).put(f"t{n}-{w}-{i}", value), n, seconds)
        counts = puts.counts
        gets = run_threads(
            lambda w, i: expect(client(w).get(f"t{n}-{w}-{i % counts[w]}"), len(value)),
            n,
            seconds,
        )
    finally:
        for one in clients:
            one.close()
    return puts, gets


# --- large values: Put, Get as bytes, Get as a view ---------------------------------------
def _large(quick: bool, lab: Lab) -> list[Row]:
    size = 32 * MIB if quick else 256 * MIB
    view_sizes = (4 * MIB, 16 * MIB) if quick else (16 * MIB, 64 * MIB)
    rounds = 2 if quick else 3
    value = payload(size)
    label = size_text(size)
    views: dict[int, tuple[float, float]] = {}

    with lab.memctl(ROOMY_LIMIT) as daemon, daemon.client(transport=SAME_HOST) as client:

        def put(key: str, data: bytes) -> float:
            start = time.perf_counter()
            location = client.put(key, data).location
            seconds = time.perf_counter() - start
            if location != "memory":
                raise RuntimeError(f"the {size_text(len(data))} value went to {location}")
            return seconds

        for small in view_sizes:
            put("view", payload(small, seed=1))
            views[small] = _view_times(client, "view", small)
            client.delete("view")

        put_time = get_time = 0.0
        for r in range(rounds):
            key = f"large-{r}"
            put_time += put(key, value)
            first, again = _view_times(client, key, size)
            if r == 0:
                views[size] = (first, again)
            start = time.perf_counter()
            data = client.get(key)
            get_time += time.perf_counter() - start
            expect(data, size)
            if data[-KIB:] != value[-KIB:]:
                raise RuntimeError(f"get of {key!r} gave other bytes than were put")
            del data
            client.delete(key)

    server = lab.get_redis()
    server.flush()
    redis = server.client()
    try:
        redis_time = 0.0
        for r in range(rounds):
            start = time.perf_counter()
            redis.set(f"large-{r}", value)
            redis_time += time.perf_counter() - start
            redis.delete(f"large-{r}")
    finally:
        redis.close()
    copy = _memory_copy(value, rounds)

    mib = size * rounds / MIB
    rows = [
        Row(f"{PREFIX}put {label}", "MiB/s", mib / put_time, mib / redis_time, "redis",
            target=LARGE_PUT_REDIS_TARGET),
        Row(f"{PREFIX}put {label}", "MiB/s", mib / put_time, copy, "memory copy",
            target=LARGE_COPY_TARGET),
        Row(f"{PREFIX}get {label} as bytes", "MiB/s", mib / get_time, copy, "memory copy",
            target=LARGE_COPY_TARGET),
    ]  # fmt: skip
    for one in sorted(views):
        first, again = views[one]
        view_label = f"{PREFIX}get_view {size_text(one)} (zero-copy)"
        rows += [
            Row(view_label, "ms, first Get after the Put", first, VIEW_TARGET_MS, "target",
                higher_is_better=False),
            Row(view_label, f"ms, median of {VIEW_REPEATS} more", again, VIEW_TARGET_MS,
                "target", higher_is_better=False),
        ]  # fmt: skip
    return rows


def _view_times(client: Client, key: str, size: int) -> tuple[float, float]:
    """Milliseconds of ``get_view(key)``: the first call, and the median of
    ``VIEW_REPEATS`` more. Each view is checked to be the daemon's segment mapped (not
    bytes copied) and of ``size`` bytes, then released, its pages never touched."""
    times: list[float] = []
    for _ in range(1 + VIEW_REPEATS):
        start = time.perf_counter()
        view = client.get_view(key)
        times.append((time.perf_counter() - start) * 1000)
        try:
            if not isinstance(view.obj, mmap.mmap) or view.nbytes != size:
                raise RuntimeError(
                    f"get_view of {key!r} gave {view.nbytes} bytes of a "
                    f"{type(view.obj).__name__}, not {size} bytes of a mapped segment"
                )
        finally:
            view.release()
    return times[0], statistics.median(times[1:])


# --- accounting -----------------------------------------------------------------------------
def _accounting(quick: bool, lab: Lab) -> list[Row]:
    total = 256 * MIB if quick else 2 * GIB
    blocks = [payload(ACCOUNTING_VALUE, seed) for seed in range(4)]
    with lab.memctl(ACCOUNTING_LIMIT) as daemon, daemon.client(transport=SAME_HOST) as client:
        client.delete("nothing")  # the channel open, before the first reading
        overhead = own_memory(daemon.pid)
        if segment_bytes(daemon.pid):
            raise RuntimeError("the daemon holds segments before the run")
        for i in range(total // ACCOUNTING_VALUE):
            client.put(f"acc-{i:03d}", blocks[i % len(blocks)])
        status = client.status()
        # Two monitor ticks, so that the daemon's own reading is of this moment.
        time.sleep(2 * status.monitor_interval_seconds + 0.05)
        service = client.status().service
        own = own_memory(daemon.pid)
        segments = segment_bytes(daemon.pid)
        managed = sum(scope.managed for scope in client.status().scopes)

    if service.managed != total or segments != total:
        raise RuntimeError(
            f"put {total} bytes; the daemon manages {service.managed} and holds {segments} "
            "in segments"
        )
    measured = own + segments
    label = f"{PREFIX}accounting, {size_text(total)} in {size_text(ACCOUNTING_VALUE)} values"
    low, high = 1 - ACCOUNTING_TOLERANCE, 1 + ACCOUNTING_TOLERANCE
    return [
        Row(label, "MiB: RSS (anon + file) + segments", measured / MIB,
            (managed + overhead) / MIB, "managed + overhead", target=low, target_max=high),
        Row(label, "MiB: the daemon's own reading", service.process / MIB, measured / MIB,
            "RSS + segments", target=low, target_max=high),
    ]  # fmt: skip


def own_memory(pid: int) -> int:
    """RssAnon + RssFile of ``pid``: its memory, less the shared memory it has touched
    (counted whole by ``segment_bytes`` instead)."""
    fields: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("RssAnon", "RssFile"):
            fields[name] = int(rest.split()[0]) * KIB
    if len(fields) != 2:
        raise RuntimeError(f"/proc/{pid}/status lacks RssAnon or RssFile")
    return fields["RssAnon"] + fields["RssFile"]


def segment_bytes(pid: int) -> int:
    """Bytes of the memfds ``pid`` holds open (links "/memfd:NAME (deleted)"), each
    counted once: the daemon holds two descriptors per segment, its own and its
    mapping's."""
    directory = f"/proc/{pid}/fd"
    sizes: dict[int, int] = {}
    for name in os.listdir(directory):
        path = f"{directory}/{name}"
        try:
            if not os.readlink(path).startswith("/memfd:"):
                continue
            found = os.stat(path)
        except FileNotFoundError:  # closed meanwhile
            continue
        sizes[found.st_ino] = found.st_size
    return sum(sizes.values())
