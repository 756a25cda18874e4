"""The processes and places a run measures: Redis, memctl daemons, a scratch directory.

Everything here is started by the suite and torn down by it, also on Ctrl-C or a
failure: children run in sessions of their own (a Ctrl-C at the terminal reaches
only the suite, which then stops them in order) and ``Lab`` stops whatever it
started when its ``with`` block ends, however it ends.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import psutil
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from memctl import AsyncClient, Client

#: Generous: the machine is small and shared.
START_DEADLINE = 30.0
STOP_DEADLINE = 20.0
#: Attempts to start a server on a port found free, in case another process takes it
#: between our finding it and the server binding it (the server then exits at once).
START_ATTEMPTS = 3


class PeerError(RuntimeError):
    """A server the suite needs could not be started."""


def free_port() -> int:
    """A loopback TCP port no one listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stop_process(process: subprocess.Popen[Any], sig: int = signal.SIGTERM) -> None:
    """Ask politely, then SIGKILL past the deadline; always reap."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr, process.stdin):
        if stream is not None:
            stream.close()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _clean_environ() -> dict[str, str]:
    """The suite's environment without MEMCTL_* (a stray MEMCTL_CONFIG would change
    what is measured)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("MEMCTL_")}


@dataclass
class RedisServer:
    """Debian's ``redis-server`` on a loopback port, persistence off."""

    process: subprocess.Popen[str]
    port: int
    log_path: Path

    @classmethod
    def start(cls, directory: Path) -> RedisServer:
        executable = shutil.which("redis-server")
        if executable is None:
            raise PeerError("redis-server is not installed (Debian: apt-get install redis-server)")
        directory.mkdir(parents=True, exist_ok=True)
        log_path = directory / "redis.log"
        for _ in range(START_ATTEMPTS):
            port = free_port()
            command = [
                executable,
                "--port", str(port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(directory),
                "--logfile", str(log_path),
                "--daemonize", "no",
            ]  # fmt: skip
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            server = cls(process, port, log_path)
            if server._wait_ready():
                return server
            silent = process.poll() is None  # alive but not answering: no use retrying
            stop_process(process, signal.SIGKILL)
            if silent:
                break
        raise PeerError(f"redis-server did not start:\n{_tail(log_path)}")

    def _wait_ready(self) -> bool:
        """Poll until our server answers (not another process that took the port), the
        process dies, or the deadline passes."""
        deadline = time.monotonic() + START_DEADLINE
        probe = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1.0, retry=Retry(NoBackoff(), 0)
        )
        try:
            while time.monotonic() < deadline and self.process.poll() is None:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if int(probe.info("server")["process_id"]) == self.process.pid:
                        return True
                time.sleep(0.02)
            return False
        finally:
            probe.close()

    def client(self, connections: int = 1) -> redis.Redis:
        """A client whose pool holds up to ``connections`` connections, for as many
        threads each making one call at a time."""
        return redis.Redis(host="127.0.0.1", port=self.port, max_connections=connections)

    def async_client(self, connections: int = 1) -> redis.asyncio.Redis:
        """The asyncio twin of ``client``, for up to ``connections`` tasks each making one
        call at a time; make it inside the loop that uses it."""
        return redis.asyncio.Redis(host="127.0.0.1", port=self.port, max_connections=connections)

    def version(self) -> str:
        client = self.client()
        try:
            info = client.info("server")
            return str(info["redis_version"])
        finally:
            client.close()

    def flush(self) -> None:
        """Start a workload from an empty server."""
        client = self.client()
        try:
            client.flushall()
        finally:
            client.close()

    def stop(self) -> None:
        stop_process(self.process)


@dataclass
class MemctlDaemon:
    """``memctl serve`` on a loopback port with its token on (the default)."""

    process: subprocess.Popen[bytes]
    address: str
    token_path: Path
    local_directory: Path
    log_path: Path

    @classmethod
    def start(cls, directory: Path, memory_limit: str, *extra: str) -> MemctlDaemon:
        """Start a daemon whose spill directory goes under ``directory``; returns once it
        has said where it listens and where its token is."""
        directory.mkdir(parents=True, exist_ok=True)
        local = directory / "local"
        log_path = directory / "daemon.log"
        for _ in range(START_ATTEMPTS):
            address = f"127.0.0.1:{free_port()}"
            command = [
                sys.executable, "-m", "memctl", "serve",
                "--address", address,
                "--memory-limit", memory_limit,
                "--local-directory", str(local),
                *extra,
            ]  # fmt: skip
            with log_path.open("w") as log:
                process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    bufsize=0,
                    env=_clean_environ(),
                    start_new_session=True,
                )
            assert process.stdout is not None
            found = _read_banner(process.stdout)
            if found is not None:
                bound, token = found
                return cls(process, bound, token, local, log_path)
            silent = process.poll() is None  # alive but not answering: no use retrying
            stop_process(process, signal.SIGKILL)
            if silent:
                break
        raise PeerError(f"memctl serve did not start:\n{_tail(log_path)}")

    @property
    def pid(self) -> int:
        return self.process.pid

    def rss(self) -> int:
        return int(psutil.Process(self.pid).memory_info().rss)

    def client(self, *, transport: str) -> Client:
        """A client over ``transport``, always named, so that no figure depends on
        ``MEMCTL_TRANSPORT`` or on what "auto" picks: "grpc", "same-host" (the daemon's
        unix-socket channel, or an error if it has none) or "auto"."""
        return Client(self.address, token_file=self.token_path, timeout=300, transport=transport)

    def async_client(self, *, transport: str) -> AsyncClient:
        """The asyncio twin of ``client``; make it inside the loop that uses it."""
        return AsyncClient(
            self.address, token_file=self.token_path, timeout=300, transport=transport
        )

    def stop(self) -> None:
        stop_process(self.process)


def _read_banner(stdout: IO[bytes]) -> tuple[str, Path] | None:
    """The address and token path from the daemon's first two stdout lines, or None if
    it exits or stays silent past the deadline. Reads the raw pipe: a buffered reader
    would swallow both lines at once and leave ``select`` waiting for more."""
    fd = stdout.fileno()
    received = b""
    deadline = time.monotonic() + START_DEADLINE
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(deadline - time.monotonic(), 0)):
                continue
            chunk = os.read(fd, 4096)
            if not chunk:  # exited
                return None
            received += chunk
            address: str | None = None
            for line in received.decode(errors="replace").splitlines(keepends=True):
                if not line.endswith("\n"):
                    break
                if line.startswith("memctl serving on "):
                    address = line.removeprefix("memctl serving on ").strip()
                elif line.startswith("memctl token in ") and address is not None:
                    return address, Path(line.removeprefix("memctl token in ").strip())
    return None


class Lab:
    """One run's scratch directory, its Redis, and the memctl daemons workloads start.

    The scratch directory holds memctl's spill directories and the raw-file peer's
    files alike, so both write to the same filesystem.
    """

    def __init__(self, parent: Path | None = None):
        self.root = Path(tempfile.mkdtemp(prefix="memctl-bench-", dir=parent))
        self.redis: RedisServer | None = None
        self._daemons: list[MemctlDaemon] = []
        self._counter = 0

    def __enter__(self) -> Lab:
        try:
            self.redis = RedisServer.start(self.root / "redis")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def get_redis(self) -> RedisServer:
        if self.redis is None:
            raise PeerError("the lab's Redis is not running")
        return self.redis

    @contextlib.contextmanager
    def memctl(self, memory_limit: str, *extra: str) -> Iterator[MemctlDaemon]:
        """A fresh daemon for one workload, stopped when it is done with it."""
        self._counter += 1
        daemon = MemctlDaemon.start(self.root / f"memctl-{self._counter}", memory_limit, *extra)
        self._daemons.append(daemon)
        try:
            yield daemon
        finally:
            daemon.stop()
            self._daemons.remove(daemon)

    def scratch(self, name: str) -> Path:
        """An empty directory in the lab (the raw-file peer's)."""
        path = self.root / name
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    def close(self) -> None:
        """Stop every process started, then remove the scratch directory."""
        for daemon in reversed(self._daemons):
            daemon.stop()
        self._daemons.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None
        shutil.rmtree(self.root, ignore_errors=True)
