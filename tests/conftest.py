"""Fixtures that start real ``memctl serve`` processes.

A daemon listens on a unix socket in the test's temporary directory (no port
races), or on 127.0.0.1 port 0 where TCP matters; the test learns the bound
address from the one line the daemon prints on stdout.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest

#: Generous: CI machines have two cores and other tests running.
START_DEADLINE = 30.0


@dataclass
class Daemon:
    """A running ``memctl serve`` process."""

    process: subprocess.Popen[str]
    address: str
    local_directory: Path
    log_path: Path
    args: list[str] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout)


def memctl_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "memctl", *args]


def run_memctl(
    *args: str, input: bytes | None = None, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[bytes]:
    """Run a ``memctl`` command to completion."""
    return subprocess.run(
        memctl_command(*args),
        input=input,
        capture_output=True,
        env={**os.environ, **(env or {})},
        timeout=timeout,
        check=False,
    )


def start_daemon(
    tmp_path: Path, *args: str, address: str | None = None, env: dict[str, str] | None = None
) -> Daemon:
    """Start ``memctl serve`` and wait (with a deadline) until it says where it listens."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    local = tmp_path / "local"
    address = address or f"unix:{tmp_path / 'memctl.sock'}"
    log_path = tmp_path / "daemon.log"
    command = memctl_command("serve", "--address", address, "--local-directory", str(local), *args)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MEMCTL_")}
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**environ, **(env or {})},
        )
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
            continue
        line = process.stdout.readline()
        if line.startswith("memctl serving on "):
            bound = line.removeprefix("memctl serving on ").strip()
            return Daemon(process, bound, local, log_path, command)
        if line == "":  # exited
            break
    process.kill()
    process.wait()
    raise AssertionError(f"memctl serve did not start:\n{log_path.read_text()}")


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """Start daemons on demand; every one is stopped at teardown."""
    started: list[Daemon] = []
    counter = iter(range(1000))

    def _spawn(*args: str, address: str | None = None, env: dict[str, str] | None = None) -> Daemon:
        daemon = start_daemon(tmp_path / f"d{next(counter)}", *args, address=address, env=env)
        started.append(daemon)
        return daemon

    yield _spawn
    for daemon in started:
        stop_with_its_workers(daemon.process)
        if daemon.process.stdout is not None:
            daemon.process.stdout.close()


def stop_with_its_workers(process: subprocess.Popen[str]) -> None:
    """SIGTERM, so that a daemon in nanny mode stops the workers it started; SIGKILL
    past a deadline; then whatever it started that outlived it (a killed nanny cannot
    stop its workers, which would go on running after the tests)."""
    if process.poll() is not None:
        return
    try:
        started = psutil.Process(process.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        started = []
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
    for child in started:
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()


#: The transports a data-plane test runs over (``pytestmark = DATA_PLANE``).
TRANSPORTS = ("grpc", "same-host")


@pytest.fixture(params=TRANSPORTS)
def transport(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test once over each transport: clients made without ``transport=``, and
    the CLI, follow MEMCTL_TRANSPORT. Forced, not auto: a test meant for the
    same-host channel fails if it cannot be had, rather than passing over gRPC."""
    monkeypatch.setenv("MEMCTL_TRANSPORT", request.param)
    return str(request.param)


#: Marks a module whose every test runs over both transports.
DATA_PLANE = pytest.mark.usefixtures("transport")


@pytest.fixture
def daemon(spawn: Callable[..., Daemon]) -> Daemon:
    """One daemon with default settings on a unix socket."""
    return spawn()


def wait_until(
    predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.05
) -> None:
    """Poll ``predicate`` until it is true, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


class RssSampler:
    """Samples a process's RSS from /proc every ``interval`` seconds on a thread."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.process = psutil.Process(pid)
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> int:
        rss = int(self.process.memory_info().rss)
        self.peak = max(self.peak, rss)
        self.samples += 1
        return rss

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.sample()
