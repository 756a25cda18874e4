"""Workloads 1-5: values in and out of memctl over gRPC, beside the same bytes in Redis,
in files and copied in memory.

Every memctl client here is made with ``transport="grpc"``: on the daemon's host the
client would otherwise pick the same-host channel by itself, which ``same_host.py``
measures. The rows' labels say nothing of the transport; the same-host rows' all
start with "same-host:".

Each workload starts a daemon of its own (so one's data cannot slow the next) and
empties Redis first; both sides move the same bytes, in the same order, from the
same kind of caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping

from .peers import Lab, MemctlDaemon, RedisServer
from .report import Row
from .timing import KIB, MIB, Sample, payload, run_sequential, run_tasks, run_threads

#: The transport every client of these workloads uses.
GRPC = "grpc"
#: Memory limit of the daemons in workloads 1-4: every value stays in RAM.
ROOMY_LIMIT = "2 GiB"
#: Values per call in the batch workload, and batches it cycles through.
BATCH = 500
BATCH_ROTATION = 20
SPILL_VALUE = 8 * MIB


def expect(value: object, size: int) -> None:
    """A wrong answer must fail the run, not make it look fast."""
    if not isinstance(value, bytes) or len(value) != size:
        got = f"{len(value)} bytes" if isinstance(value, bytes) else repr(value)[:40]
        raise RuntimeError(f"expected a value of {size} bytes, got {got}")


def size_text(nbytes: int) -> str:
    if nbytes >= MIB and nbytes % MIB == 0:
        return f"{nbytes // MIB:,} MiB"
    return f"{nbytes // KIB:,} KiB"


def op_rows(workload: str, memctl: Sample, redis: Sample, quantiles: Iterable[int]) -> list[Row]:
    """ops/s, then latency percentiles (ms), of memctl beside Redis."""
    rows = [Row(workload, "ops/s", memctl.ops_per_second, redis.ops_per_second, "redis")]
    rows.extend(
        Row(
            workload,
            f"p{q} ms",
            memctl.latency_ms(q),
            redis.latency_ms(q),
            "redis",
            higher_is_better=False,
        )
        for q in quantiles
    )
    return rows


# --- 1. one client, one key at a time ------------------------------------------------
def sequential_put_get(
    put: Callable[[str, bytes], object],
    get: Callable[[str], object],
    value: bytes,
    seconds: float,
) -> tuple[Sample, Sample]:
    """Puts of ``value`` one after another for ``seconds``, then Gets of what was put."""
    puts = run_sequential(lambda i: put(f"s{i}", value), seconds)
    written = puts.counts[0]
    gets = run_sequential(lambda i: expect(get(f"s{i % written}"), len(value)), seconds)
    return puts, gets


def run_single(quick: bool, lab: Lab) -> list[Row]:
    """Sequential Put/Get of 1 KiB values: what one call costs, round trip included."""
    seconds = 0.4 if quick else 3.0
    value = payload(KIB)
    server = lab.get_redis()
    server.flush()
    with lab.memctl(ROOMY_LIMIT) as daemon, daemon.client(transport=GRPC) as client:
        m_put, m_get = sequential_put_get(client.put, client.get, value, seconds)
    redis = server.client()
    try:
        r_put, r_get = sequential_put_get(redis.set, redis.get, value, seconds)
    finally:
        redis.close()
    return [
        *op_rows("put 1 KiB, 1 client", m_put, r_put, (50, 99)),
        *op_rows("get 1 KiB, 1 client", m_get, r_get, (50, 99)),
    ]


# --- 2. many callers sharing one client ----------------------------------------------
def run_concurrent(quick: bool, lab: Lab) -> list[Row]:
    """8 and 32 threads (or asyncio tasks) sharing one client: what the client and the
    daemon make of concurrency on a small machine."""
    seconds = 0.25 if quick else 2.0
    value = payload(KIB)
    server = lab.get_redis()
    rows: list[Row] = []
    with lab.memctl(ROOMY_LIMIT) as daemon:
        for n in (8, 32):
            server.flush()
            m_put, m_get = _memctl_threads(daemon, n, seconds, value)
            r_put, r_get = _redis_threads(server, n, seconds, value)
            rows += op_rows(f"put 1 KiB, {n} threads", m_put, r_put, (99,))
            rows += op_rows(f"get 1 KiB, {n} threads", m_get, r_get, (99,))
        for n in (8, 32):
            server.flush()
            m_put, m_get = asyncio.run(_memctl_tasks(daemon, n, seconds, value))
            r_put, r_get = asyncio.run(_redis_tasks(server, n, seconds, value))
            rows += op_rows(f"put 1 KiB, {n} asyncio tasks", m_put, r_put, (99,))
            rows += op_rows(f"get 1 KiB, {n} asyncio tasks", m_get, r_get, (99,))
    return rows


def _memctl_threads(
    daemon: MemctlDaemon, n: int, seconds: float, value: bytes
) -> tuple[Sample, Sample]:
    with daemon.client(transport=GRPC) as client:
        return _threads(client.put, client.get, n, seconds, value)


def _redis_threads(
    server: RedisServer, n: int, seconds: float, value: bytes
) -> tuple[Sample, Sample]:
    redis = server.client(connections=n)
    try:
        return _threads(redis.set, redis.get, n, seconds, value)
    finally:
        redis.close()


def _threads(
    put: Callable[[str, bytes], object],
    get: Callable[[str], object],
    n: int,
    seconds: float,
    value: bytes,
) -> tuple[Sample, Sample]:
    """``n`` threads putting for ``seconds``, then reading back what each put."""
    puts = run_threads(lambda w, i: put(f"t{n}-{w}-{i}", value), n, seconds)
    counts = puts.counts
    gets = run_threads(lambda w, i: expect(get(f"t{n}-{w}-{i % counts[w]}"), KIB), n, seconds)
    return puts, gets


async def _memctl_tasks(
    daemon: MemctlDaemon, n: int, seconds: float, value: bytes
) -> tuple[Sample, Sample]:
    async with daemon.async_client(transport=GRPC) as client:
        return await _tasks(client.put, client.get, n, seconds, value)


async def _redis_tasks(
    server: RedisServer, n: int, seconds: float, value: bytes
) -> tuple[Sample, Sample]:
    redis = server.async_client(connections=n)
    try:
        return await _tasks(redis.set, redis.get, n, seconds, value)
    finally:
        await redis.aclose()


async def _tasks(
    put: Callable[[str, bytes], Awaitable[object]],
    get: Callable[[str], Awaitable[object]],
    n: int,
    seconds: float,
    value: bytes,
) -> tuple[Sample, Sample]:
    """``n`` asyncio tasks putting for ``seconds``, then reading back what each put."""

    async def put_one(w: int, i: int) -> None:
        await put(f"a{n}-{w}-{i}", value)

    puts = await run_tasks(put_one, n, seconds)
    counts = puts.counts

    async def get_one(w: int, i: int) -> None:
        expect(await get(f"a{n}-{w}-{i % counts[w]}"), KIB)

    return puts, await run_tasks(get_one, n, seconds)


# --- 3. batches ------------------------------------------------------------------------
def run_batch(quick: bool, lab: Lab) -> list[Row]:
    """500 values per call against a Redis pipeline of 500 SETs and an MGET: the per-call
    cost spread over many small values."""
    seconds = 0.4 if quick else 2.0
    value = payload(KIB)
    batches = [[f"b{b}-{j}" for j in range(BATCH)] for b in range(BATCH_ROTATION)]
    items = [dict.fromkeys(keys, value) for keys in batches]
    server = lab.get_redis()
    server.flush()

    def check(found: object) -> None:
        """A dict from get_many, a list from MGET: all BATCH values there."""
        values = list(found.values()) if isinstance(found, Mapping) else found
        if not isinstance(values, list) or len(values) != BATCH:
            raise RuntimeError(f"a batch read of {BATCH} values gave {str(values)[:40]}")
        expect(values[0], KIB)

    with lab.memctl(ROOMY_LIMIT) as daemon, daemon.client(transport=GRPC) as client:
        m_put = run_sequential(lambda i: client.put_many(items[i % BATCH_ROTATION]), seconds)
        written = min(m_put.counts[0], BATCH_ROTATION)
        m_get = run_sequential(lambda i: check(client.get_many(batches[i % written])), seconds)

    redis = server.client()

    def pipeline_set(i: int) -> None:
        pipe = redis.pipeline(transaction=False)
        for key, data in items[i % BATCH_ROTATION].items():
            pipe.set(key, data)
        pipe.execute()

    try:
        r_put = run_sequential(pipeline_set, seconds)
        r_written = min(r_put.counts[0], BATCH_ROTATION)
        r_get = run_sequential(lambda i: check(redis.mget(batches[i % r_written])), seconds)
    finally:
        redis.close()

    def values_per_second(sample: Sample) -> float:
        return sample.ops_per_second * BATCH

    return [
        Row(
            f"put {BATCH} values of 1 KiB per call",
            "values/s",
            values_per_second(m_put),
            values_per_second(r_put),
            "redis",
        ),
        Row(
            f"get {BATCH} values of 1 KiB per call",
            "values/s",
            values_per_second(m_get),
            values_per_second(r_get),
            "redis",
        ),
    ]


# --- 4. large values -------------------------------------------------------------------
def run_large(quick: bool, lab: Lab) -> list[Row]:
    """One large value in RAM: streaming throughput, beside Redis and a plain memcpy
    (the most any store could do)."""
    size = 32 * MIB if quick else 256 * MIB
    rounds = 2 if quick else 3
    value = payload(size)
    server = lab.get_redis()
    server.flush()

    with lab.memctl(ROOMY_LIMIT) as daemon, daemon.client(transport=GRPC) as client:

        def memctl_put(key: str) -> None:
            location = client.put(key, value).location
            if location != "memory":
                raise RuntimeError(f"the {size_text(size)} value went to {location}, not RAM")

        m_put, m_get = _put_get_rounds(
            memctl_put, client.get, lambda key: client.delete(key), rounds, size
        )

    redis = server.client()
    try:
        r_put, r_get = _put_get_rounds(
            lambda key: redis.set(key, value), redis.get, redis.delete, rounds, size
        )
    finally:
        redis.close()
    copy = _memory_copy(value, rounds)

    label = size_text(size)
    return [
        Row(f"put {label}", "MiB/s", m_put, r_put, "redis"),
        Row(f"put {label}", "MiB/s", m_put, copy, "memory copy"),
        Row(f"get {label}", "MiB/s", m_get, r_get, "redis"),
        Row(f"get {label}", "MiB/s", m_get, copy, "memory copy"),
    ]


def _put_get_rounds(
    put: Callable[[str], object],
    get: Callable[[str], object],
    delete: Callable[[str], object],
    rounds: int,
    size: int,
) -> tuple[float, float]:
    """MiB/s of ``rounds`` puts and gets of one value, each round's value deleted after
    (so only one is ever held)."""
    put_time = get_time = 0.0
    for r in range(rounds):
        key = f"large-{r}"
        start = time.perf_counter()
        put(key)
        middle = time.perf_counter()
        data = get(key)
        end = time.perf_counter()
        expect(data, size)
        del data
        delete(key)
        put_time += middle - start
        get_time += end - middle
    mib = size * rounds / MIB
    return mib / put_time, mib / get_time


def _memory_copy(value: bytes, rounds: int) -> float:
    """MiB/s of copying ``value`` into a buffer whose pages are already faulted in."""
    target = bytearray(len(value))
    view = memoryview(target)
    view[:] = value  # fault every page in before the clock starts
    start = time.perf_counter()
    for _ in range(rounds):
        view[:] = value
    seconds = time.perf_counter() - start
    return len(value) * rounds / MIB / seconds


# --- 5. spilling -----------------------------------------------------------------------
def run_spill(quick: bool, lab: Lab) -> list[Row]:
    """Four times the memory limit through memctl, most of it to disk and back, beside
    writing and reading the same bytes as plain files on the same filesystem."""
    limit = 64 * MIB if quick else 256 * MIB
    total = 4 * limit
    count = total // SPILL_VALUE
    blocks = [payload(SPILL_VALUE, seed) for seed in range(4)]
    keys = [f"v{i:04d}" for i in range(count)]

    with lab.memctl(f"{limit // MIB} MiB") as daemon, daemon.client(transport=GRPC) as client:
        start = time.perf_counter()
        for i, key in enumerate(keys):
            client.put(key, blocks[i % len(blocks)])
        m_put = time.perf_counter() - start
        spilled = client.status().service.spilled
        if spilled == 0:
            raise RuntimeError("nothing was spilled: the workload measured RAM only")
        start = time.perf_counter()
        for key in keys:
            expect(client.get(key), SPILL_VALUE)
        m_get = time.perf_counter() - start

    directory = lab.scratch("raw-files")
    paths = [directory / key for key in keys]
    start = time.perf_counter()
    for i, path in enumerate(paths):
        path.write_bytes(blocks[i % len(blocks)])
    f_put = time.perf_counter() - start
    start = time.perf_counter()
    for path in paths:
        expect(path.read_bytes(), SPILL_VALUE)
    f_get = time.perf_counter() - start
    for path in paths:
        path.unlink()

    mib = total / MIB
    label = f"{size_text(total)} in 8 MiB values, limit {size_text(limit)}"
    return [
        Row(f"spill: put {label}", "MiB/s", mib / m_put, mib / f_put, "raw file"),
        Row(f"spill: get {label}", "MiB/s", mib / m_get, mib / f_get, "raw file"),
    ]
