"""``python -m benchmarks``: start the peers, run the workloads, print the table, write
the JSON.

A workload is a function ``run_xxx(quick, ...) -> list[Row]`` named in ``WORKLOADS``
as "module:function"; it gets ``lab`` (the running peers, ``benchmarks.peers.Lab``)
if it has a parameter of that name. Adding one is one line in ``WORKLOADS``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import inspect
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, cast

import grpc
import psutil
import redis
from rich.console import Console
from rich.table import Table

from .peers import Lab, PeerError
from .report import Row

DEFAULT_JSON = Path(__file__).parent / "results" / "latest.json"


@dataclass(frozen=True)
class Workload:
    name: str
    #: "module:function", imported when the workload runs.
    target: str
    about: str

    def function(self) -> Callable[..., list[Row]]:
        module, _, attribute = self.target.partition(":")
        return cast(Callable[..., list[Row]], getattr(importlib.import_module(module), attribute))


WORKLOADS: list[Workload] = [
    # The data plane over gRPC (transport="grpc"); "same-host" below is the channel's.
    Workload("single", "benchmarks.data_plane:run_single", "1 KiB put/get, one client"),
    Workload("concurrent", "benchmarks.data_plane:run_concurrent", "8 and 32 threads/tasks"),
    Workload("batch", "benchmarks.data_plane:run_batch", "500 values per call"),
    Workload("large", "benchmarks.data_plane:run_large", "256 MiB values in RAM"),
    Workload("spill", "benchmarks.data_plane:run_spill", "4x the memory limit via disk"),
    Workload("control", "benchmarks.control:run_control", "PAUSE latency, 1-64 workers"),
    Workload("scale", "benchmarks.scale:run_scale", "1,000,000 small keys"),
    Workload(
        "same-host",
        "benchmarks.same_host:run_same_host",
        "the unix-socket channel: 1 KiB ops, 256 MiB memfds, accounting",
    ),
]


@dataclass
class Outcome:
    """What became of one workload: ran (with rows) or failed (with why)."""

    name: str
    status: str
    seconds: float
    rows: list[Row]
    detail: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "seconds": round(self.seconds, 3),
            "detail": self.detail,
            "rows": len(self.rows),
        }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks", description="memctl beside Redis, files and memcpy"
    )
    parser.add_argument("--quick", action="store_true", help="every workload, briefly")
    parser.add_argument(
        "--only",
        action="append",
        choices=[w.name for w in WORKLOADS],
        metavar="NAME",
        help=f"run only this workload (repeatable): {', '.join(w.name for w in WORKLOADS)}",
    )
    parser.add_argument(
        "--json", type=Path, default=DEFAULT_JSON, help=f"where to write (default {DEFAULT_JSON})"
    )
    parser.add_argument(
        "--directory",
        type=Path,
        default=None,
        help="where spill directories and raw files go (default: the system's temp dir)",
    )
    return parser.parse_args(argv)


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def run_one(workload: Workload, quick: bool, lab: Lab) -> Outcome:
    start = time.monotonic()
    try:
        function = workload.function()
        kwargs = {"lab": lab} if "lab" in inspect.signature(function).parameters else {}
        rows = function(quick, **kwargs)
    except Exception as exc:
        detail = "".join(traceback.format_exception_only(exc)).strip()
        traceback.print_exc(file=sys.stderr)
        return Outcome(workload.name, "failed", time.monotonic() - start, [], detail)
    return Outcome(workload.name, "ran", time.monotonic() - start, rows)


def describe(outcome: Outcome, index: int, total: int) -> str:
    head = f"[{index}/{total}] {outcome.name}:"
    if outcome.status == "ran":
        return f"{head} {len(outcome.rows)} rows in {outcome.seconds:.1f} s"
    first = outcome.detail.splitlines()[0] if outcome.detail else ""
    return f"{head} {outcome.status} ({first}) after {outcome.seconds:.1f} s"


def figure(value: float) -> str:
    """Three significant figures at most, thousands separated."""
    if not math.isfinite(value):
        return str(value)
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def table(rows: Sequence[Row], title: str) -> Table:
    result = Table(title=title)
    result.add_column("workload")
    result.add_column("metric")
    result.add_column("memctl", justify="right")
    result.add_column("peer", justify="right")
    result.add_column("ratio", justify="right")
    result.add_column("target", justify="right")
    for row in rows:
        peer = "" if row.peer is None else f"{row.peer_name} {figure(row.peer)}"
        ratio = row.ratio
        if ratio is None:
            shown = ""
        else:
            colour = "green" if row.met else "red"
            shown = f"[{colour}]{ratio:.2f}[/{colour}]"
        result.add_row(row.workload, row.metric, figure(row.memctl), peer, shown, row.target_text)
    return result


def machine_info(redis_version: str) -> dict[str, Any]:
    """What a figure depends on besides memctl, so two runs can be compared."""
    return {
        "cpu_count": os.cpu_count(),
        "total_memory": psutil.virtual_memory().total,
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "redis_py": redis.__version__,
        "hiredis": bool(redis.utils.HIREDIS_AVAILABLE),
        "redis_server": redis_version,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _terminate(signum: int, frame: FrameType | None) -> None:
    """SIGTERM unwinds like Ctrl-C, so the peers are torn down."""
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    chosen = [w for w in WORKLOADS if args.only is None or w.name in args.only]
    mode = "quick" if args.quick else "full"
    signal.signal(signal.SIGTERM, _terminate)
    started = time.monotonic()
    outcomes: list[Outcome] = []
    try:
        with Lab(args.directory) as lab:
            redis_version = lab.get_redis().version()
            progress(
                f"benchmarks ({mode}): redis-server {redis_version} on port "
                f"{lab.get_redis().port}, scratch in {lab.root}"
            )
            for index, workload in enumerate(chosen, 1):
                outcome = run_one(workload, args.quick, lab)
                outcomes.append(outcome)
                progress(describe(outcome, index, len(chosen)))
    except KeyboardInterrupt:
        progress("benchmarks: interrupted; peers stopped")
        return 130
    except PeerError as exc:
        progress(f"benchmarks: {exc}")
        return 1
    elapsed = time.monotonic() - started

    rows = [row for outcome in outcomes for row in outcome.rows]
    console = Console()
    if not console.is_terminal:  # a file or a pipe: every row on one line, never wrapped
        console = Console(width=max(console.width, 200))
    console.print(table(rows, f"memctl benchmarks ({mode}, {elapsed:.0f} s)"))
    console.print(
        "ratio > 1: memctl does better than the peer (or meets the target); green: the "
        "ratio meets its target (1 where none is shown)"
    )
    console.print(
        'transport: rows whose workload starts "same-host:" use the same-host channel '
        '(transport="same-host"), every other row gRPC (transport="grpc")'
    )

    report = {
        "mode": mode,
        "seconds": round(elapsed, 3),
        "machine": machine_info(redis_version),
        "workloads": [outcome.as_json() for outcome in outcomes],
        # "name": the workload (in WORKLOADS) that measured the row.
        "rows": [{"name": o.name, **row.as_json()} for o in outcomes for row in o.rows],
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    progress(f"benchmarks: wrote {args.json}")
    return 1 if any(outcome.status == "failed" for outcome in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
