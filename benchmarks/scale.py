"""Workload 7: many small keys. Does Status stay fast, and what does a key cost the
daemon in memory? Judged against targets rather than a peer."""

from __future__ import annotations

import time

from memctl import Client

from .data_plane import BATCH
from .peers import Lab
from .report import Row
from .timing import payload, percentile

#: Goals the figures are judged against (peer "target").
STATUS_TARGET_MS = 5.0
BYTES_PER_KEY_TARGET = 200.0
STATUS_CALLS = 50
FEW_KEYS = 10
VALUE_SIZE = 16


def key(i: int) -> str:
    return f"k{i:07d}"


def status_p50_ms(client: Client) -> float:
    """Median of ``STATUS_CALLS`` Status calls, one after another."""
    client.status()  # untimed: the first call may still be opening the channel
    latencies: list[float] = []
    for _ in range(STATUS_CALLS):
        start = time.perf_counter()
        client.status()
        latencies.append(time.perf_counter() - start)
    return percentile(latencies, 50) * 1000


def run_scale(quick: bool, lab: Lab) -> list[Row]:
    """1,000,000 keys of 16 bytes (quick: 10,000), put 500 at a time into a fresh
    daemon."""
    nkeys = 10_000 if quick else 1_000_000
    value = payload(VALUE_SIZE)
    with lab.memctl("2 GiB") as daemon, daemon.client(transport="grpc") as client:
        client.put_many({key(i): value for i in range(FEW_KEYS)})
        few = status_p50_ms(client)
        rss_before = daemon.rss()
        for start in range(FEW_KEYS, nkeys, BATCH):
            client.put_many({key(i): value for i in range(start, min(start + BATCH, nkeys))})
        stored = client.status().service
        if stored.keys_in_memory + stored.keys_on_disk != nkeys:
            raise RuntimeError(
                f"the daemon holds {stored.keys_in_memory + stored.keys_on_disk} keys, not {nkeys}"
            )
        many = status_p50_ms(client)
        per_key = (daemon.rss() - rss_before) / (nkeys - FEW_KEYS)

    return [
        Row(
            f"status, {FEW_KEYS} keys",
            "p50 ms",
            few,
            STATUS_TARGET_MS,
            "target",
            higher_is_better=False,
        ),
        Row(
            f"status, {nkeys:,} keys",
            "p50 ms",
            many,
            STATUS_TARGET_MS,
            "target",
            higher_is_better=False,
        ),
        Row(
            f"daemon RSS growth, {nkeys:,} keys",
            "bytes/key",
            per_key,
            BYTES_PER_KEY_TARGET,
            "target",
            higher_is_better=False,
        ),
    ]
