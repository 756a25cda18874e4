"""Workload 6: the control plane. How soon PAUSE reaches workers that all cross the pause
line at once, what an idle daemon with N attached workers costs, and how fast Status is.

A ``memctl serve`` of its own (loopback, ``memory.monitor-interval`` 200 ms) and N real
worker processes (``python -m benchmarks.control --worker``), each attached with a
128 MiB limit. Once every worker is attached (and, reporting its RSS, has been heard
from), the daemon's CPU over an idle window and Status latency are measured. Then, in
rounds (16 // N of them, at least one, each at a random moment against the daemon's
ticks and heartbeats), every worker (its RSS at 77% of its limit) is told "go" at
once and writes pages 1 MiB at a time up to 83% (over pause, 80%, under terminate,
95%), noting ``time.monotonic()`` (one clock for every process on Linux) right after
the MiB that took its RSS over the pause line; the latency is PAUSE's arrival minus
that moment. The worker then frees memory down to 72% (under the resume line, 75%),
waits for RESUME and grows back to 77%.

Two modes: the daemon reads the worker's RSS by PID ("pid"), or the worker reports it
in heartbeats with no PID the daemon can use ("heartbeat": ``pid=0``,
``report_rss=True``, as from another PID namespace).

``python -m benchmarks.control [--quick]`` prints the rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import queue
import random
import selectors
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil

from benchmarks.report import Row
from memctl import Client

ROOT = Path(__file__).resolve().parent.parent
WORKLOAD = "control"
INTERVAL = 0.2
#: ``control.heartbeat-interval``'s default.
HEARTBEAT = 1.0
#: PAUSE is due within one monitor interval plus this.
SLACK = 0.05
LIMIT = 128 << 20
PAUSE, TERMINATE = 0.80, 0.95
#: Each worker's RSS before "go" (just under the pause line) and after (over it, well
#: under terminate), written 1 MiB at a time: 64 workers writing more at once would
#: measure how fast the host faults pages in more than how fast PAUSE comes.
START, FILL, CHUNK = 0.77, 0.83, 1 << 20
#: Freed down to between rounds: under the resume line (pause - margin = 75%).
LOW = 0.72
IDLE_TARGET_PERCENT = 2.0
STATUS_TARGET_MS = 5.0
START_DEADLINE = 60.0


@dataclass
class Run:
    """One (N, mode) run's figures."""

    workers: int
    mode: str
    latencies: list[float]
    idle_cpu: float
    status: list[float]


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile: with few samples the p99 is the worst, not a blend."""
    ordered = sorted(samples)
    return ordered[max(math.ceil(q / 100 * len(ordered)) - 1, 0)]


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid``, to the nanosecond (``/proc/PID/task/*/schedstat``),
    where psutil's ``cpu_times`` counts 10 ms ticks: 2 ticks in 2 s would read as 1%."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):  # the thread ended meanwhile
            continue
    if total:
        return total / 1e9
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


@contextmanager
def serve(directory: Path) -> Iterator[tuple[str, int]]:
    """A ``memctl serve`` on a free loopback port: its address and pid."""
    log = (directory / "daemon.log").open("w")
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEMCTL_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "memctl",
            "serve",
            "--address",
            "127.0.0.1:0",
            "--local-directory",
            str(directory / "local"),
            "--set",
            f"memory.monitor-interval={INTERVAL}",
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env=environ,
    )
    try:
        assert process.stdout is not None
        address = _serving_address(process.stdout)
        if address is None:
            raise RuntimeError(f"memctl serve did not start; see {directory / 'daemon.log'}")
        yield address, process.pid
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _serving_address(stdout: IO[str]) -> str | None:
    selector = selectors.DefaultSelector()
    selector.register(stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
            continue
        line = stdout.readline()
        if line.startswith("memctl serving on "):
            return line.removeprefix("memctl serving on ").strip()
        if not line:
            return None
    return None


class WorkerProcess:
    """A ``--worker`` subprocess: "go" on stdin, JSON lines on stdout."""

    def __init__(self, address: str, worker_id: str, mode: str):
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MEMCTL_")}
        # Every 1 MiB chunk its own mmap, so that freeing it lowers RSS at once.
        environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.control", "--worker", address, worker_id, mode],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=environ,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")

    def message(self, deadline: float) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            raise RuntimeError("a worker said nothing before the deadline") from None
        if not line:
            raise RuntimeError(f"a worker exited with {self.process.wait()}")
        message: dict[str, Any] = json.loads(line)
        return message

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def measure(workers: int, mode: str, *, idle: float, status_calls: int, rounds: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="memctl-bench-control-") as tmp, ExitStack() as stack:
        address, pid = stack.enter_context(serve(Path(tmp)))
        procs = [WorkerProcess(address, f"w{i}", mode) for i in range(workers)]
        for proc in procs:
            stack.callback(proc.close)
        deadline = time.monotonic() + START_DEADLINE + workers
        for proc in procs:
            assert proc.message(deadline)["event"] == "ready"
        client = stack.enter_context(Client(address))
        # Every worker attached and, reporting its RSS, heard from (its process > 0).
        while True:
            scopes = [s for s in client.status().scopes if s.kind == "worker"]
            if len(scopes) == workers and all(s.process > 0 for s in scopes):
                break
            if time.monotonic() > deadline:
                raise RuntimeError("the workers' readings did not reach the daemon")
            time.sleep(0.05)

        before, started = cpu_seconds(pid), time.monotonic()
        time.sleep(idle)
        after, ended = cpu_seconds(pid), time.monotonic()
        idle_cpu = 100 * (after - before) / (ended - started)

        status = []
        for _ in range(status_calls + 3):
            begun = time.perf_counter()
            client.status()
            status.append(time.perf_counter() - begun)
        status = status[3:]  # the first calls warm the channel

        latencies = []
        phase = random.Random(workers)
        for _ in range(rounds):
            # A random phase against the monitor's ticks and the heartbeats (1 s): a
            # round starts right after the RESUME of a tick, and would otherwise cross
            # the line at the same point of every interval.
            time.sleep(phase.uniform(0, HEARTBEAT))
            for proc in procs:
                proc.go()
            deadline = time.monotonic() + 60
            for proc in procs:
                paused, ready = proc.message(deadline), proc.message(deadline)
                if (paused["event"], ready["event"]) != ("paused", "ready"):
                    raise RuntimeError(f"a worker said {paused} then {ready}")
                latencies.append(paused["received"] - paused["crossed"])
        return Run(workers, mode, latencies, idle_cpu, status)


def rows_of(run: Run) -> list[Row]:
    n, mode = run.workers, run.mode
    due = (INTERVAL + SLACK) * 1000
    ms = [latency * 1000 for latency in run.latencies]
    return [
        Row(WORKLOAD, f"PAUSE p50 ms, {mode} RSS, {n} workers", percentile(ms, 50), due,
            "target", higher_is_better=False),
        Row(WORKLOAD, f"PAUSE p99 ms, {mode} RSS, {n} workers", percentile(ms, 99), due,
            "target", higher_is_better=False),
        Row(WORKLOAD, f"idle daemon CPU %, {mode} RSS, {n} workers", run.idle_cpu,
            IDLE_TARGET_PERCENT, "target", higher_is_better=False),
        Row(WORKLOAD, f"Status p50 ms, {mode} RSS, {n} workers",
            statistics.median(run.status) * 1000, STATUS_TARGET_MS, "target",
            higher_is_better=False),
    ]  # fmt: skip


def run_control(quick: bool) -> list[Row]:
    """Workload 6's rows: N = 1, 16, 64 workers (quick: 1, 4), PID and heartbeat RSS."""
    rows = []
    for n in (1, 4) if quick else (1, 16, 64):
        for mode in ("pid", "heartbeat"):
            run = measure(
                n,
                mode,
                idle=2.0 if quick else 5.0,
                status_calls=20 if quick else 50,
                rounds=max(16 // n, 1),
            )
            rows.extend(rows_of(run))
    return rows


# --- the worker process -----------------------------------------------------------------


def _statm_rss() -> int:
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(address: str, worker_id: str, mode: str) -> None:
    """Attach; then, for every "go" on stdin, cross the pause line, report PAUSE's delay,
    free memory down again and wait for RESUME, and say "ready"."""
    reported = mode == "heartbeat"
    with (
        Client(address) as client,
        client.attach(
            worker_id, memory_limit=LIMIT, report_rss=reported, pid=0 if reported else None
        ) as session,
    ):
        ballast: list[bytes] = []
        grow(ballast, START)
        print(json.dumps({"event": "ready"}), flush=True)
        while sys.stdin.readline() == "go\n":
            crossed = grow(ballast, FILL)
            pause = session.wait_for("pause", timeout=60)
            assert crossed is not None, "the worker started above the pause line"
            paused = {"event": "paused", "crossed": crossed, "received": pause.received_at}
            print(json.dumps(paused))
            while _statm_rss() >= LOW * LIMIT and ballast:
                ballast.pop()
            session.wait_for("resume", timeout=60)
            grow(ballast, START)
            print(json.dumps({"event": "ready"}), flush=True)


def grow(ballast: list[bytes], fraction: float) -> float | None:
    """Write 1 MiB pages (resident, unlike a bare ``bytearray(n)``) until RSS reaches
    ``fraction`` of the limit; when RSS went over the pause line, if it did."""
    crossed = None
    while (rss := _statm_rss()) < fraction * LIMIT:
        ballast.append(b"\x01" * CHUNK)
        if crossed is None and _statm_rss() > PAUSE * LIMIT:
            crossed = time.monotonic()
    assert rss <= TERMINATE * LIMIT
    return crossed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1 and 4, shorter windows")
    parser.add_argument("--worker", nargs=3, metavar=("ADDRESS", "ID", "MODE"), help="internal")
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    for row in run_control(args.quick):
        ratio = f"{row.ratio:.2f}" if row.ratio is not None else "-"
        print(f"{row.metric:<42} {row.memctl:>9.2f}  {row.peer_name} {row.peer:g}  x{ratio}")


if __name__ == "__main__":
    main()
