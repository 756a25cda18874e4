"""The benchmark suite runs end to end in quick mode: real Redis, real daemons."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import WORKLOADS
from benchmarks.report import Row
from benchmarks.same_host import PREFIX, own_memory, segment_bytes

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(
    shutil.which("redis-server") is None,
    reason="redis-server is not installed (./scripts/test installs Debian's redis-server)",
)
def test_quick_suite(tmp_path: Path) -> None:
    out = tmp_path / "results.json"
    result = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())

    outcomes = {w["name"]: w for w in report["workloads"]}
    assert list(outcomes) == [w.name for w in WORKLOADS]
    for name, w in outcomes.items():
        assert w["status"] == "ran", (name, w)
        # One progress line per workload, as it goes, and rows of its own.
        assert f"] {name}: " in result.stderr
        assert any(row["name"] == name for row in report["rows"]), name
    assert {row["name"] for row in report["rows"]} <= set(outcomes)

    for row in report["rows"]:
        figures = [row["memctl"]] + ([row["peer"], row["ratio"]] if row["peer_name"] else [])
        for figure in figures:
            assert isinstance(figure, float | int), row
            assert math.isfinite(figure), row
            assert figure > 0, row

        if row["target"] is not None:
            assert isinstance(row["met"], bool), row
    # The transport of every row shows: the same-host workload's rows, and only they,
    # are labelled so (every other memctl row is gRPC).
    for row in report["rows"]:
        assert row["workload"].startswith(PREFIX) == (row["name"] == "same-host"), row

    machine = report["machine"]
    assert machine["cpu_count"] >= 1
    assert machine["total_memory"] > 0
    for key in ("python", "grpcio", "redis_py", "redis_server", "date"):
        assert machine[key], key

    # The table, on stdout: its headings and every row's workload.
    for heading in ("workload", "metric", "memctl", "peer", "ratio"):
        assert heading in result.stdout
    for row in report["rows"]:
        assert row["workload"] in result.stdout, row["workload"]


def test_row_targets() -> None:
    plain = Row("w", "ops/s", 150.0, 100.0, "redis")
    assert plain.met and plain.target_text == ""
    goal = Row("w", "ops/s", 150.0, 100.0, "redis", target=1.5)
    assert goal.met and goal.target_text == ">= 1.5"
    assert not Row("w", "ops/s", 149.0, 100.0, "redis", target=1.5).met
    latency = Row("w", "p99 ms", 2.0, 1.0, "redis", higher_is_better=False, target=1.0)
    assert latency.ratio == 0.5 and not latency.met
    band = Row("w", "MiB", 104.0, 100.0, "accounted", target=0.95, target_max=1.05)
    assert band.met and band.target_text == "0.95-1.05"
    assert not Row("w", "MiB", 106.0, 100.0, "accounted", target=0.95, target_max=1.05).met
    assert Row("w", "ms", 1.0).met is None
    assert band.as_json()["met"] is True


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="memfds are Linux's")
def test_memory_readings() -> None:
    """A memfd held through two descriptors counts once, at its size."""
    before = segment_bytes(os.getpid())
    fd = os.memfd_create("bench-test")
    other = -1
    try:
        os.ftruncate(fd, 3 << 20)
        other = os.dup(fd)
        assert segment_bytes(os.getpid()) - before == 3 << 20
    finally:
        os.close(fd)
        if other >= 0:
            os.close(other)
    assert segment_bytes(os.getpid()) == before
    assert own_memory(os.getpid()) > 0
