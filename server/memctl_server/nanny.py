"""Nanny mode: start worker processes, restart them when they die or are terminated.

``memctl serve --worker "CMD ..." --nworkers N`` starts N copies of CMD, as Dask's
nanny starts its worker. Each gets the service's environment plus
``nanny.environ`` (``MALLOC_TRIM_THRESHOLD_=65536`` by default), ``MEMCTL_ADDRESS``
(where to attach), ``MEMCTL_WORKER_ID`` (``worker-0``, ``worker-1``, …),
``MEMCTL_RESUME_SECRET`` (the secret proving it is that worker: the same for every
incarnation of a slot, so a restarted worker takes its data back) and
``MEMCTL_TOKEN`` (a worker token: it reaches only that worker's own data).

A worker that exits on its own is restarted with backoff (1 s doubling to 30 s,
back to 1 s once it has run a minute); one the service terminates is restarted at
once. Terminating is: the TERMINATE command (sent by the control plane), up to
``nanny.terminate-notice`` for the worker to act on it — cut short when it answers,
exits or its stream ends — then SIGTERM, then SIGKILL after ``nanny.terminate-grace``.
Without the notice SIGTERM always overtook the command, and a worker never learnt
why it died. Only these child processes are ever signalled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shlex
import signal
import time
from dataclasses import dataclass, field

from memctl.auth import (
    RESUME_SECRET_VARIABLE,
    TOKEN_FILE_VARIABLE,
    TOKEN_VARIABLE,
    WORKER_ID_VARIABLE,
)

from .auth import Authenticator
from .events import EventLog

logger = logging.getLogger(__name__)

BACKOFF_START, BACKOFF_MAX, HEALTHY_AFTER = 1.0, 30.0, 60.0


@dataclass
class Slot:
    worker_id: str
    #: Proves an attaching process is this slot's worker (``MEMCTL_RESUME_SECRET``).
    secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    #: Why the service itself is killing the process (restart without backoff).
    terminating: str | None = None
    exited: asyncio.Event = field(default_factory=asyncio.Event)


class Nanny:
    """Supervises ``nworkers`` copies of one command."""

    def __init__(
        self,
        command: str,
        nworkers: int,
        *,
        environ: dict[str, str],
        address: str,
        terminate_notice: float,
        terminate_grace: float,
        events: EventLog,
        authenticator: Authenticator,
    ):
        self.argv = shlex.split(command)
        self.events = events
        self.environ = environ
        self.address = address
        self.terminate_notice = terminate_notice
        self.terminate_grace = terminate_grace
        self.authenticator = authenticator
        self.slots = {f"worker-{i}": Slot(f"worker-{i}") for i in range(nworkers)}
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._supervise(slot)) for slot in self.slots.values()]

    def _env(self, slot: Slot) -> dict[str, str]:
        environ = {
            **os.environ,
            **self.environ,
            "MEMCTL_ADDRESS": self.address,
            WORKER_ID_VARIABLE: slot.worker_id,
            RESUME_SECRET_VARIABLE: slot.secret,
        }
        environ.pop(TOKEN_FILE_VARIABLE, None)
        environ.pop(TOKEN_VARIABLE, None)
        if self.authenticator.enabled:
            environ[TOKEN_VARIABLE] = self.authenticator.worker_token(slot.worker_id)
        return environ

    async def _supervise(self, slot: Slot) -> None:
        backoff = BACKOFF_START
        why = ""  # why the previous incarnation ended; empty for the first start
        while not self._stopping:
            if why:
                slot.restarts += 1
                self.events.record("restart", slot.worker_id, why, restarts=slot.restarts)
            started = time.monotonic()
            why = "could not be started"
            try:
                slot.process = await asyncio.create_subprocess_exec(*self.argv, env=self._env(slot))
            except OSError as exc:
                logger.error("Cannot start worker %r (%s): %s", slot.worker_id, self.argv[0], exc)
            else:
                slot.exited.clear()
                logger.info("Started worker %r, pid %d", slot.worker_id, slot.process.pid)
                code = await slot.process.wait()
                slot.exited.set()
                if self._stopping:
                    return
                logger.warning(
                    "Worker %r (pid %d) exited with %s", slot.worker_id, slot.process.pid, code
                )
                why = f"exited with {code}"
            if slot.terminating is not None:
                why, slot.terminating = f"terminated by memctl: {slot.terminating}", None
                backoff = BACKOFF_START
            else:
                if time.monotonic() - started >= HEALTHY_AFTER:
                    backoff = BACKOFF_START
                logger.info("Restarting worker %r in %.0f s", slot.worker_id, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_MAX)

    def slot_secret(self, worker_id: str) -> str | None:
        """The secret of the slot ``worker_id``; None if the nanny has no such slot."""
        slot = self.slots.get(worker_id)
        return slot.secret if slot is not None else None

    async def terminate(self, worker_id: str, reason: str, heard: asyncio.Event) -> None:
        """Once the worker has ``heard`` TERMINATE (or the notice is up, or it exited):
        SIGTERM, then SIGKILL after the grace period; the supervisor restarts it."""
        slot = self.slots.get(worker_id)
        process = slot.process if slot is not None else None
        if slot is None or process is None or process.returncode is not None:
            return
        slot.terminating = reason
        if self.terminate_notice > 0:
            await _first(heard, slot.exited, timeout=self.terminate_notice)
            if slot.process is not process or process.returncode is not None:
                logger.info("Worker %r exited after TERMINATE; no signal needed", worker_id)
                return
            logger.info(
                "Worker %r %s; sending SIGTERM",
                worker_id,
                "heard TERMINATE"
                if heard.is_set()
                else f"did not answer TERMINATE within {self.terminate_notice:g} s",
            )
        await self._kill(slot)

    async def _kill(self, slot: Slot) -> None:
        process = slot.process
        assert process is not None
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(slot.exited.wait(), self.terminate_grace)
        except TimeoutError:
            logger.warning(
                "Worker %r did not exit %.0f s after SIGTERM; sending SIGKILL",
                slot.worker_id,
                self.terminate_grace,
            )
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            await slot.exited.wait()

    async def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL) and stop restarting them."""
        self._stopping = True
        running = [
            s for s in self.slots.values() if s.process is not None and s.process.returncode is None
        ]
        await asyncio.gather(*(self._kill(slot) for slot in running))
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _first(*events: asyncio.Event, timeout: float) -> None:
    """Return when any of ``events`` is set, or after ``timeout`` seconds."""
    waits = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()
