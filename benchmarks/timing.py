"""Timed loops shared by the workloads: one caller, threads, or asyncio tasks.

Loops run for a fixed time rather than a fixed count, so that a busy machine makes a
run no longer, only its figures lower. Each caller makes a few untimed calls first
(connections opened, pools filled), then all start together.
"""

from __future__ import annotations

import asyncio
import math
import random
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

KIB = 1024
MIB = 1024 * KIB
GIB = 1024 * MIB
#: Untimed calls each caller makes before the clock starts.
WARMUP = 3


def payload(size: int, seed: int = 0) -> bytes:
    """Incompressible bytes (spill compression must not flatter memctl), the same from
    run to run: random, repeating every MiB (farther than lz4's or zlib's window
    reaches), so that 256 MiB takes no time to make."""
    block = random.Random(seed).randbytes(min(size, MIB))
    return (block * -(-size // len(block)))[:size]


def percentile(samples: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), nearest rank: a figure that was measured."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(math.ceil(q / 100 * len(ordered)), 1)
    return ordered[rank - 1]


@dataclass
class Sample:
    """What a timed loop did: calls made by each caller, and how long each took."""

    seconds: float
    #: Per caller, the index of its next call: its calls were 0 .. count - 1, the
    #: first ``WARMUP`` of them untimed.
    counts: list[int]
    latencies: list[float]

    @property
    def ops(self) -> int:
        return len(self.latencies)

    @property
    def ops_per_second(self) -> float:
        return self.ops / self.seconds

    def latency_ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


def run_sequential(op: Callable[[int], object], seconds: float) -> Sample:
    """Call ``op(0)``, ``op(1)``, … from this thread for ``seconds``."""
    for i in range(WARMUP):
        op(i)
    latencies: list[float] = []
    i = WARMUP
    start = time.perf_counter()
    deadline = start + seconds
    now = start
    while now < deadline:
        op(i)
        after = time.perf_counter()
        latencies.append(after - now)
        now = after
        i += 1
    return Sample(now - start, [i], latencies)


def run_threads(op: Callable[[int, int], object], nthreads: int, seconds: float) -> Sample:
    """``nthreads`` threads, thread ``w`` calling ``op(w, 0)``, ``op(w, 1)``, … until
    ``seconds`` after they all started. An exception in any thread is raised here."""
    start = [0.0]
    counts = [0] * nthreads
    ends = [0.0] * nthreads
    latencies: list[list[float]] = [[] for _ in range(nthreads)]
    errors: list[BaseException] = []

    def started() -> None:
        start[0] = time.perf_counter()

    barrier = threading.Barrier(nthreads, action=started)

    def worker(w: int) -> None:
        mine = latencies[w]
        i = 0
        try:
            for i in range(WARMUP):
                op(w, i)
            i = WARMUP
            barrier.wait()
            now = start[0]
            deadline = now + seconds
            while now < deadline:
                op(w, i)
                after = time.perf_counter()
                mine.append(after - now)
                now = after
                i += 1
            ends[w] = now
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()
        finally:
            counts[w] = i

    threads = [
        threading.Thread(target=worker, args=(w,), name=f"bench-{w}", daemon=True)
        for w in range(nthreads)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if errors:
        raise (real or errors)[0]
    return Sample(max(ends) - start[0], counts, [x for mine in latencies for x in mine])


async def run_tasks(
    op: Callable[[int, int], Awaitable[object]], ntasks: int, seconds: float
) -> Sample:
    """The asyncio twin of ``run_threads``: ``ntasks`` tasks on the running loop."""
    start = [0.0]
    counts = [0] * ntasks
    ends = [0.0] * ntasks
    latencies: list[list[float]] = [[] for _ in range(ntasks)]
    ready = 0
    go = asyncio.Event()

    async def worker(w: int) -> None:
        nonlocal ready
        mine = latencies[w]
        for i in range(WARMUP):
            await op(w, i)
        i = WARMUP
        ready += 1
        if ready == ntasks:
            start[0] = time.perf_counter()
            go.set()
        await go.wait()
        now = start[0]
        deadline = now + seconds
        while now < deadline:
            await op(w, i)
            after = time.perf_counter()
            mine.append(after - now)
            now = after
            i += 1
        ends[w] = now
        counts[w] = i

    async with asyncio.TaskGroup() as group:
        for w in range(ntasks):
            group.create_task(worker(w))
    return Sample(max(ends) - start[0], counts, [x for mine in latencies for x in mine])
