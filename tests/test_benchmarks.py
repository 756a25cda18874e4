"""The benchmark suite runs end to end in quick mode: real Redis, real daemons."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.__main__ import WORKLOADS

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
