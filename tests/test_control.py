"""The worker control stream, the threshold engine at work, and nanny mode, end to end.

Real daemons, real worker processes that really allocate memory
(``tests/workers/grower.py``), real signals.
"""

from __future__ import annotations

import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest

from memctl import Client
from memctl.errors import FailedPrecondition
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.control import alive_without_heartbeats, process_started
from tests.conftest import DATA_PLANE, Daemon, run_memctl, wait_until
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

MiB = 1 << 20
GROWER = Path(__file__).parent / "workers" / "grower.py"
MUTE = Path(__file__).parent / "workers" / "mute.py"
INTERVAL = 0.2  # the default memory.monitor-interval


class GrowerProcess:
    """An interactive grower: commands in on stdin, JSON events out on stdout."""

    def __init__(self, address: str, worker_id: str, limit: str, *flags: str):
        env = {**os.environ, "MEMCTL_ADDRESS": address, "MALLOC_TRIM_THRESHOLD_": "65536"}
        self.process = subprocess.Popen(
            [sys.executable, str(GROWER), worker_id, limit, *flags],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        # A thread reads lines as they come: select() on the pipe would miss lines
        # already in the reader's buffer when two arrive together.
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.commands: list[dict[str, Any]] = []

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line)
        self.lines.put("")  # the worker exited

    def event(self, timeout: float = 30) -> dict[str, Any]:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no event from the worker within {timeout} s") from None
        if not line:
            raise AssertionError(f"the worker exited ({self.process.wait()})")
        event: dict[str, Any] = json.loads(line)
        if event["event"] == "command":
            self.commands.append(event)
        return event

    def until(self, kind: str, timeout: float = 30, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = self.event(max(deadline - time.monotonic(), 0.01))
            if event["event"] == kind and all(event.get(k) == v for k, v in match.items()):
                return event

    def do(self, line: str) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()
        return self.until("done", cmd=line)

    def command(self, kind: str, timeout: float = 30) -> dict[str, Any]:
        """The first command of ``kind`` received, waiting for it if need be."""
        for command in self.commands:
            if command["type"] == kind:
                return command
        return self.until("command", timeout, type=kind)

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


@pytest.fixture
def growers() -> Iterator[Callable[..., GrowerProcess]]:
    started: list[GrowerProcess] = []

    def start(address: str, worker_id: str, limit: str, *flags: str) -> GrowerProcess:
        grower = GrowerProcess(address, worker_id, limit, *flags)
        started.append(grower)
        return grower

    yield start
    for grower in started:
        grower.close()


def scope(client: Client, name: str) -> Any:
    (found,) = [s for s in client.status().scopes if s.name == name]
    return found


def test_pause_resume_terminate_a_real_worker(
    daemon: Daemon, growers: Callable[..., GrowerProcess]
) -> None:
    limit = 200 * MiB
    worker = growers(daemon.address, "grower", "200MiB")
    attached = worker.until("attached")
    assert attached["limit"] == limit

    # Grow in steps until process memory crosses the pause line (80%).
    while True:
        done = worker.do("grow 8MiB")
        if done["rss"] > 0.8 * limit:
            break
        assert not [c for c in worker.commands if c["type"] == "pause"], "paused too early"
    pause = worker.command("pause")
    assert pause["process"] > 0.8 * limit
    assert "pause threshold (80% of 200.00 MiB" in pause["reason"]
    latency = pause["received"] - done["t"]
    assert latency <= 2 * INTERVAL, f"PAUSE came {latency:.3f} s after crossing"
    with Client(daemon.address) as client:
        wait_until(lambda: scope(client, "grower").state == "paused")
        assert scope(client, "grower").pid == worker.process.pid

    # Free below the resume line (pause 80% - margin 5% = 75%).
    while worker.do("free 8MiB")["rss"] >= 0.75 * limit:
        pass
    resume = worker.command("resume")
    assert resume["process"] < 0.75 * limit
    assert "resume line (75%" in resume["reason"]

    # Grow past 95%: TERMINATE. Not started by memctl, so it is told, never signalled.
    while worker.do("grow 8MiB")["rss"] <= 0.95 * limit:
        pass
    terminate = worker.command("terminate")
    assert "terminate threshold (95%" in terminate["reason"]
    with Client(daemon.address) as client:
        wait_until(lambda: scope(client, "grower").state == "terminating")
    assert worker.process.poll() is None
    assert worker.do("grow 0")["state"] == "terminating"


def start_nanny_grower(
    spawn: Callable[..., Daemon], tmp_path: Path, *args: str, **env: str
) -> tuple[Daemon, Callable[[], list[dict[str, Any]]]]:
    """A daemon supervising one scripted grower, and a reader of the grower's events."""
    events = tmp_path / "events.jsonl"
    daemon = spawn(
        "--worker",
        f"{sys.executable} {GROWER} --nanny",
        *args,
        env={"GROWER_EVENTS": str(events), "GROWER_LIMIT": "200MiB", "GROWER_VALUES": "5", **env},
    )

    def read() -> list[dict[str, Any]]:
        if not events.exists():
            return []
        return [json.loads(line) for line in events.read_text().splitlines()]

    return daemon, read


def incarnations(log: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """The grower's events, one list per process, in the order they started."""
    pids = list(dict.fromkeys(e["pid"] for e in log))
    return [[e for e in log if e["pid"] == pid] for pid in pids]


def heard(events: list[dict[str, Any]]) -> list[str]:
    """What one incarnation received: command types and "sigterm", in order."""
    return [e.get("type") or e["event"] for e in events if e["event"] in ("command", "sigterm")]


def test_nanny_restarts_terminated_worker_and_its_data_survives(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon, read = start_nanny_grower(spawn, tmp_path)
    wait_until(lambda: any(e["event"] == "checked" for e in read()), timeout=120)
    first, second = incarnations(read())[:2]
    assert first[0]["event"] == "attached" and first[0]["kept"] == 0
    # TERMINATE, with its reason, reaches the worker before SIGTERM does.
    assert heard(first)[:1] == ["pause"] and heard(first)[-2:] == ["terminate", "sigterm"]
    (terminate,) = [e for e in first if e.get("type") == "terminate"]
    assert "terminate threshold (95% of 200.00 MiB" in terminate["reason"]
    assert "terminate scope='worker-0': process memory" in daemon.log()
    assert "Worker 'worker-0' heard TERMINATE; sending SIGTERM" in daemon.log()
    first_pid = first[0]["pid"]
    assert not psutil.pid_exists(first_pid) or psutil.Process(first_pid).status() == "zombie"
    assert second[0]["event"] == "attached" and second[0]["kept"] == 5
    checked = next(e for e in second if e["event"] == "checked")
    assert checked["ok"] and checked["keys"] == 5  # byte-identical, by digest
    with Client(daemon.address) as client:
        worker = scope(client, "worker-0")
        assert worker.pid == second[0]["pid"] and worker.state == "running"
    assert "sending SIGKILL" not in daemon.log()  # SIGTERM sufficed


def test_pause_timeout_tells_the_worker_before_signalling_it(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon, read = start_nanny_grower(
        spawn,
        tmp_path,
        "--set",
        "memory.pause-timeout=1s",
        GROWER_OBEY_PAUSE="1",  # stays paused, under the terminate line
        GROWER_STEP="16MiB",
    )
    wait_until(lambda: any(e["event"] == "checked" for e in read()), timeout=120)
    first = incarnations(read())[0]
    assert heard(first) == ["pause", "terminate", "sigterm"]
    (pause,) = [e for e in first if e.get("type") == "pause"]
    (terminate,) = [e for e in first if e.get("type") == "terminate"]
    assert "longer than memory.pause-timeout (1 s)" in terminate["reason"]
    assert terminate["received"] - pause["received"] > 0.8  # 1 s, give or take delivery
    assert "terminate threshold" not in daemon.log()
    assert "Worker 'worker-0' heard TERMINATE; sending SIGTERM" in daemon.log()


def test_terminate_notice_ends_when_a_worker_does_not_answer(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    daemon, read = start_nanny_grower(
        spawn,
        tmp_path,
        "--set",
        "nanny.terminate-notice=2s",
        GROWER_HANG_ON_TERMINATE="1",
        GROWER_STEP="16MiB",
    )
    wait_until(lambda: len(incarnations(read())) == 2, timeout=120)
    first = incarnations(read())[0]
    assert heard(first)[-2:] == ["terminate", "sigterm"]
    (terminate,) = [e for e in first if e.get("type") == "terminate"]
    (sigterm,) = [e for e in first if e["event"] == "sigterm"]
    # Its handler never returns, so no answer: SIGTERM comes when the notice is up
    # (counted from the moment it was sent, a little before it was received).
    assert 1.5 <= sigterm["t"] - terminate["received"] < 5.0
    assert "did not answer TERMINATE within 2 s; sending SIGTERM" in daemon.log()
    assert "sending SIGKILL" not in daemon.log()


def test_a_workers_values_spill_not_its_neighbours(daemon: Daemon) -> None:
    with (
        Client(daemon.address) as small,
        Client(daemon.address) as large,
        small.attach("small", memory_limit="20MiB"),
        large.attach("large", memory_limit="4GiB"),
    ):
        for i in range(10):
            small.put(f"s{i}", os.urandom(2 * MiB))
        for i in range(5):
            large.put(f"l{i}", os.urandom(2 * MiB))
        with Client(daemon.address) as observer:
            # Down to the target soon after the answers: a scope spills behind them.
            wait_until(lambda: scope(observer, "small").managed <= 0.6 * 20 * MiB, timeout=10)
            s, big = scope(observer, "small"), scope(observer, "large")
            assert s.kind == "worker" and s.keys_on_disk > 0
            assert big.keys_on_disk == 0 and big.managed == 10 * MiB
            service = scope(observer, "service")
            assert service.managed == 0  # the workers' data is not the service's
        assert len(small.get("s3")) == 2 * MiB  # spilled, still readable
        with pytest.raises(KeyError):
            large.get("s3")  # scopes are separate namespaces


def test_a_claimed_pid_is_never_signalled(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn(
        "--worker", f"{sys.executable} -c 'import time; time.sleep(600)'", "--nworkers", "1"
    )
    wait_until(lambda: len(psutil.Process(daemon.pid).children()) == 1)
    (nanny_child,) = psutil.Process(daemon.pid).children()
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        with Client(daemon.address) as client:
            with client.attach("impostor", memory_limit="1MiB", pid=victim.pid) as session:
                command = session.wait_for("terminate", timeout=30)
                assert "terminate threshold" in command.reason
                assert not session.supervised
                later = client.status().uptime_seconds + 5 * INTERVAL
                wait_until(lambda: client.status().uptime_seconds > later)
                assert victim.poll() is None, "memctl signalled a process it did not start"
            # The nanny's worker id is its worker's alone, whatever PID is claimed.
            for pid in (victim.pid, nanny_child.pid):
                with pytest.raises(FailedPrecondition, match="nanny"):
                    client.attach("worker-0", memory_limit="1MiB", pid=pid)
            assert nanny_child.is_running() and nanny_child.status() != "zombie"
        assert psutil.Process(daemon.pid).children() == [nanny_child]  # never restarted
    finally:
        victim.kill()
        victim.wait()


def test_detached_data_is_kept_then_released(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--set", "control.retention=3s")
    with Client(daemon.address) as client:
        with client.attach("w", memory_limit="1GiB") as session:
            assert session.keys_kept == 0
            client.put("k", b"kept")
        secret = session.resume_secret
        observer = Client(daemon.address)
        wait_until(lambda: scope(observer, "w").state == "detached")
        assert scope(observer, "w").keys_in_memory == 1
        with client.attach("w", memory_limit="1GiB", resume_secret=secret) as session:
            assert session.keys_kept == 1
            assert client.get("k") == b"kept"
        wait_until(lambda: "w" not in {s.name for s in observer.status().scopes}, timeout=30)
        observer.close()


def test_duplicate_worker_id_is_refused(daemon: Daemon) -> None:
    with (
        Client(daemon.address) as one,
        Client(daemon.address) as two,
        one.attach("same"),
        pytest.raises(FailedPrecondition, match="already attached"),
    ):
        two.attach("same")


class MuteWorker:
    """A worker process that attaches, then never sends a heartbeat (``workers/mute.py``)."""

    def __init__(self, address: str, worker_id: str, pid: str, *flags: str):
        self.process = subprocess.Popen(
            [sys.executable, str(MUTE), address, worker_id, pid, *flags],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline() == "attached\n"

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        assert self.process.stdout is not None
        self.process.stdout.close()


@pytest.fixture
def mutes() -> Iterator[Callable[..., MuteWorker]]:
    started: list[MuteWorker] = []

    def start(*args: str) -> MuteWorker:
        started.append(MuteWorker(*args))
        return started[-1]

    yield start
    for mute in started:
        mute.close()


def exited_pid() -> int:
    """The PID of a process that has come and gone: no live process here has it."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    return gone.pid


def test_alive_without_heartbeats_means_the_same_live_process() -> None:
    me = psutil.Process()
    assert process_started(me.pid) == me.create_time()
    assert alive_without_heartbeats(me.pid, me.create_time(), reports_rss=False)
    # Its heartbeats carry its RSS: its PID may name another process here.
    assert not alive_without_heartbeats(me.pid, me.create_time(), reports_rss=True)
    # Not visible at hello; or the PID now names a process started later.
    assert not alive_without_heartbeats(me.pid, None, reports_rss=False)
    assert not alive_without_heartbeats(me.pid, me.create_time() - 1, reports_rss=False)
    assert process_started(exited_pid()) is None and process_started(0) is None
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        started = process_started(child.pid)
        assert started is not None
        wait_until(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
        assert not alive_without_heartbeats(child.pid, started, reports_rss=False)
    finally:
        child.wait()


def test_silent_worker_whose_process_lives_stays_attached(
    spawn: Callable[..., Daemon], mutes: Callable[..., MuteWorker]
) -> None:
    daemon = spawn("--set", "control.heartbeat-timeout=1s")
    mute = mutes(daemon.address, "held", "self")
    with Client(daemon.address) as client:
        attached_at = client.status().uptime_seconds
        assert scope(client, "held").pid == mute.process.pid
        kept = f"but its process (pid {mute.process.pid}) is alive: it stays attached"
        wait_until(lambda: kept in daemon.log())
        later = attached_at + 5  # five heartbeat timeouts
        wait_until(lambda: client.status().uptime_seconds > later)
        assert scope(client, "held").state == "running"
        assert "Worker 'held' detached" not in daemon.log()
        # Its stream breaking still detaches it at once.
        mute.close()
        wait_until(lambda: scope(client, "held").state == "detached", timeout=10)
    (detached,) = [line for line in daemon.log().splitlines() if "Worker 'held' detached" in line]
    assert "stream" in detached and "heartbeat" not in detached  # broke, or ended with it


@pytest.mark.parametrize(
    ("pid", "flags", "why"),
    [
        ("exited", (), r"pid \d+ is not a live process this service can see"),
        ("self", ("--report-rss",), "it reports its own RSS"),
    ],
)
def test_silent_worker_the_service_cannot_see_is_detached(
    spawn: Callable[..., Daemon],
    mutes: Callable[..., MuteWorker],
    pid: str,
    flags: tuple[str, ...],
    why: str,
) -> None:
    daemon = spawn("--set", "control.heartbeat-timeout=1s")
    mute = mutes(daemon.address, "mute", str(exited_pid()) if pid == "exited" else pid, *flags)
    with Client(daemon.address) as client:
        wait_until(lambda: scope(client, "mute").state == "detached", timeout=15)
    assert mute.process.poll() is None  # alive all along
    assert re.search(r"Worker 'mute' detached \(no heartbeat for \d+ s; " + why, daemon.log())


def test_attach_errors(daemon: Daemon) -> None:
    with raw_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        for hello, words in (
            (pb.Hello(worker_id=""), "worker id"),
            (pb.Hello(worker_id="service"), "reserved"),
            (pb.Hello(worker_id="w", memory_limit="lots"), "lots"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                next(stub.Attach(iter([pb.AttachRequest(hello=hello)]), timeout=10))
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            heartbeat = pb.AttachRequest(heartbeat=pb.Heartbeat())
            next(stub.Attach(iter([heartbeat]), timeout=10))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as info:
            stub.Stat(pb.StatRequest(key="k"), metadata=(("memctl-session", "bogus"),), timeout=10)
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "attach again" in info.value.details()


def test_status_cli_shows_every_scope(daemon: Daemon) -> None:
    with Client(daemon.address) as client, client.attach("w1", memory_limit="1GiB"):
        client.put("x", b"y" * MiB)
        result = run_memctl("status", "--address", daemon.address)
        text = result.stdout.decode()
        rows = {line.split()[0]: line for line in text.splitlines() if line.strip()}
        assert "running" in rows["w1"] and "1.00 MiB" in rows["w1"]
        assert "service" in rows
        status = json.loads(run_memctl("status", "--json", "--address", daemon.address).stdout)
        (w1,) = [s for s in status["scopes"] if s["name"] == "w1"]
        assert w1["kind"] == "worker" and w1["pid"] == os.getpid() and w1["managed"] == MiB


def test_trim_reaches_attached_workers(daemon: Daemon) -> None:
    with Client(daemon.address) as worker, worker.attach("w") as session:
        with Client(daemon.address) as other:
            assert other.trim(workers=True).workers_asked == 1
        command = session.wait_for("trim", timeout=30)
        assert command.type == "trim"
    wait_until(lambda: "answered command" in daemon.log())


def test_store_without_evict_turns_thresholds_off(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn(
        "--memory-limit", "16MiB", "--set", "store.factory=tests.plugin_stores:plain_dict"
    )
    with Client(daemon.address) as client:
        for i in range(6):
            client.put(f"k{i}", os.urandom(2 * MiB))  # 12 MiB > target 9.6 MiB
        service = scope(client, "service")
        assert service.keys_on_disk == 0 and service.managed == 12 * MiB
        assert client.get("k0") and client.delete(["k0"]) == 1
    assert daemon.log().count("target and spill thresholds are off") == 1


def test_store_with_evict_keeps_target(spawn: Callable[..., Daemon], tmp_path: Path) -> None:
    config = tmp_path / "store.yaml"
    config.write_text(
        "store:\n  factory: tests.plugin_stores:two_tier\n  kwargs: {label: from-config}\n"
    )
    daemon = spawn("--memory-limit", "16MiB", "--config", str(config))
    with Client(daemon.address) as client:
        for i in range(6):
            client.put(f"k{i}", os.urandom(2 * MiB))
        service = scope(client, "service")
        assert service.keys_on_disk > 0 and service.managed <= 0.6 * 16 * MiB
        assert client.stat("k0").location == "disk" and len(client.get("k0")) == 2 * MiB
    assert "thresholds are off" not in daemon.log()


def test_unimportable_store_stops_startup(tmp_path: Path) -> None:
    result = run_memctl(
        "serve",
        "--address",
        f"unix:{tmp_path}/s",
        "--local-directory",
        str(tmp_path),
        "--set",
        "store.factory=no_such_module:factory",
    )
    assert result.returncode == 1
    assert b"no_such_module" in result.stderr and b"Traceback" not in result.stderr


def test_worker_that_dies_is_restarted_with_backoff(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--worker", f"{sys.executable} -c 'import sys; sys.exit(3)'")
    wait_until(lambda: "Restarting worker 'worker-0' in 2 s" in daemon.log(), timeout=30)
    log = daemon.log()
    assert "Worker 'worker-0'" in log and "exited with 3" in log
    assert log.index("Restarting worker 'worker-0' in 1 s") < log.index("in 2 s")
    assert daemon.stop() == 0  # stopping does not wait for the backoff


def test_shutdown_ends_attach_streams_instead_of_waiting_out_the_grace(daemon: Daemon) -> None:
    with Client(daemon.address) as client, client.attach("w") as session:
        started = time.monotonic()
        assert daemon.stop() == 0
        # Draining waits up to 5 s for in-flight calls; attached streams are ended at once.
        assert time.monotonic() - started < 5.0
        wait_until(lambda: not session.connected)
    log = daemon.log()
    assert "Traceback" not in log and " ERROR " not in log
    assert "the service is shutting down" in log
