"""A test worker that really allocates memory and obeys memctl's commands.

Two ways to drive it:

- interactive (``python grower.py WORKER_ID LIMIT [--report-rss]``): one command per
  line on stdin, one JSON event per line on stdout. Commands: ``put N SIZE`` (values
  ``v0``…), ``check N SIZE`` (get them back, compare), ``grow SIZE``, ``free SIZE``,
  ``exit``. Every command answers ``{"event": "done", "cmd": ..., "rss": ...}``.
  ``--report-rss``: it reports its RSS in heartbeats, with no PID the service can read.
- scripted (``--nanny``, as a worker started by ``memctl serve --worker``): worker id
  and address from ``MEMCTL_WORKER_ID``/``MEMCTL_ADDRESS``, the limit from
  ``GROWER_LIMIT``, events appended to the file ``GROWER_EVENTS``. The first
  incarnation puts ``GROWER_VALUES`` values then grows ``GROWER_STEP`` bytes at a
  time until it is terminated; a later one (its scope kept values) reads every
  value back, reports their digests, and idles. ``GROWER_OBEY_PAUSE=1``: it stops
  growing while paused, as a well-behaved worker would. ``GROWER_HANG_ON_TERMINATE=1``:
  its terminate handler never returns, so TERMINATE is never answered. SIGTERM is
  reported as ``{"event": "sigterm"}`` before it exits with 143.

Commands from the service are reported as ``{"event": "command", "type": ...}`` with
``t`` (monotonic seconds, comparable across processes on one host).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import sys
import threading
import time
from typing import Any

import psutil

from memctl import Client
from memctl.sizes import parse_bytes
from memctl.worker import Command

CHUNK = 1 << 20


def value(i: int, size: int) -> bytes:
    return random.Random(i).randbytes(size)


class Grower:
    def __init__(self, events_path: str | None):
        self.heap: list[bytearray] = []
        self.events_path = events_path
        # Reentrant: the SIGTERM handler may run on the main thread inside emit().
        self.lock = threading.RLock()
        self.process = psutil.Process()

    def emit(self, **event: Any) -> None:
        event.update(t=time.monotonic(), pid=os.getpid(), rss=self.process.memory_info().rss)
        line = json.dumps(event)
        with self.lock:
            if self.events_path:
                with open(self.events_path, "a") as fh:
                    fh.write(line + "\n")
            else:
                print(line, flush=True)

    def on_command(self, command: Command) -> None:
        self.emit(
            event="command",
            type=command.type,
            reason=command.reason,
            process=command.readings.get("process", 0),
            received=command.received_at,
        )

    def grow(self, size: int) -> None:
        # Filled, so every page is resident (a zeroed buffer would not be).
        for _ in range(0, size, CHUNK):
            self.heap.append(bytearray(b"\x01") * CHUNK)

    def free(self, size: int) -> None:
        for _ in range(0, size, CHUNK):
            if self.heap:
                self.heap.pop()


def interactive(worker_id: str, limit: str, *flags: str) -> None:
    grower = Grower(None)
    report = "--report-rss" in flags  # as from another PID namespace
    with (
        Client() as client,
        client.attach(
            worker_id, memory_limit=limit, report_rss=report, pid=0 if report else None
        ) as session,
    ):
        for name in ("pause", "resume", "terminate", "trim"):
            session.on(name, grower.on_command)
        grower.emit(event="attached", limit=session.memory_limit, kept=session.keys_kept)
        for line in sys.stdin:
            cmd, *args = line.split()
            if cmd == "exit":
                break
            if cmd == "put":
                for i in range(int(args[0])):
                    client.put(f"v{i}", value(i, parse_bytes(args[1])))
            elif cmd == "check":
                ok = all(
                    client.get(f"v{i}") == value(i, parse_bytes(args[1]))
                    for i in range(int(args[0]))
                )
                grower.emit(event="checked", ok=ok)
            elif cmd == "grow":
                grower.grow(parse_bytes(args[0]))
            elif cmd == "free":
                grower.free(parse_bytes(args[0]))
            grower.emit(event="done", cmd=line.strip(), state=session.state)


def scripted() -> None:
    grower = Grower(os.environ["GROWER_EVENTS"])
    count = int(os.environ.get("GROWER_VALUES", "5"))
    size = parse_bytes(os.environ.get("GROWER_VALUE_SIZE", "1MiB"))
    step = parse_bytes(os.environ.get("GROWER_STEP", "8MiB"))
    obey_pause = os.environ.get("GROWER_OBEY_PAUSE") == "1"

    def on_sigterm(signum: int, frame: object) -> None:
        grower.emit(event="sigterm")
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    with Client() as client:
        session = client.attach(
            os.environ["MEMCTL_WORKER_ID"], memory_limit=os.environ["GROWER_LIMIT"]
        )
        for name in ("pause", "resume", "terminate"):
            session.on(name, grower.on_command)
        if os.environ.get("GROWER_HANG_ON_TERMINATE") == "1":
            session.on("terminate", lambda command: threading.Event().wait())
        grower.emit(event="attached", limit=session.memory_limit, kept=session.keys_kept)
        if session.keys_kept:
            digests = {
                f"v{i}": hashlib.sha256(client.get(f"v{i}")).hexdigest() for i in range(count)
            }
            expected = {f"v{i}": hashlib.sha256(value(i, size)).hexdigest() for i in range(count)}
            grower.emit(event="checked", ok=digests == expected, keys=len(digests))
            threading.Event().wait()  # idle until the service stops us
        for i in range(count):
            client.put(f"v{i}", value(i, size))
        grower.emit(event="stored", values=count)
        while True:  # grow until terminated
            if not (obey_pause and session.state == "paused"):
                grower.grow(step)
                grower.emit(event="grown")
            time.sleep(0.3)


if __name__ == "__main__":
    if sys.argv[1:] == ["--nanny"]:
        scripted()
    else:
        interactive(sys.argv[1], sys.argv[2], *sys.argv[3:])
