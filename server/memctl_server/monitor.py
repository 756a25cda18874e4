"""The monitor: every ``monitor-interval``, sample memory, ask the engine, act.

Sampling and acting are I/O (``/proc``, the store thread, worker streams); the rules
are in ``engine.py``, which this module feeds and obeys. Dask's equivalent is the
worker's memory monitor, run every 200 ms.

A tick reads every process once, then decides for every scope and sends every
command without waiting on anything: a spill runs in the background (one at a time
per scope), so no scope's PAUSE waits behind another's disk writes. Between ticks,
a heartbeat whose reported RSS crosses one of its scope's lines (``watch_lines``)
has that scope decided on at once, by the same code.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .control import ControlPlane
from .core import MemoryService, worker_rss
from .engine import (
    Decision,
    EngineSettings,
    Pause,
    Report,
    Resume,
    ScopeInput,
    Spill,
    Terminate,
    decide,
    watch_lines,
)
from .events import EventLog
from .readings import MemoryReadings
from .scopes import Scope, ScopeKind

logger = logging.getLogger(__name__)


class Monitor:
    def __init__(
        self,
        core: MemoryService,
        control: ControlPlane,
        events: EventLog,
        settings: EngineSettings,
        interval: float,
    ):
        self.core = core
        self.control = control
        self.events = events
        self.settings = settings
        self.interval = interval
        #: The spill under way for each scope, by scope name.
        self._spills: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Tick every interval, on a fixed schedule (a tick's own time does not push the
        next one back), until cancelled; a failing tick is logged, never fatal."""
        due = time.monotonic()
        try:
            while True:
                try:
                    await self.tick()
                except Exception:
                    logger.exception("Memory monitor tick failed; trying again next interval")
                now = time.monotonic()
                due = max(due + self.interval, now)  # behind: tick now, not twice
                await asyncio.sleep(due - now)
        finally:
            for task in [*self._spills.values(), *self._background]:
                task.cancel()

    async def tick(self) -> None:
        now = time.monotonic()
        self.core.measure()
        self.control.measure()
        for snap in self.core.snapshot(record=True):
            self._evaluate(snap.scope, snap.readings, now)
        await self.control.release_expired(now)

    def attached(self, scope: Scope) -> None:
        """Work out the lines of a worker that reports its own RSS, before its first
        report, so that it knows when to send one."""
        scope_input = self._input(scope, self.core.readings_now(scope))
        scope.lines = watch_lines(scope_input, scope.memo, self.settings)
        self.control.watch(scope, scope.lines)

    def reported(self, scope: Scope) -> None:
        """A heartbeat brought a worker's RSS: if it crossed a line, decide now. A
        failure is logged, never the stream's: the next tick decides anyway."""
        if not (scope.attached and scope.lines.crossed(worker_rss(scope) + scope.sizes.managed)):
            return
        now = time.monotonic()
        try:
            self._evaluate(scope, self.core.readings_now(scope, record_at=now), now)
        except Exception:
            logger.exception("Deciding on %r's reported RSS failed; the next tick will", scope.name)

    def _input(self, scope: Scope, readings: MemoryReadings) -> ScopeInput:
        return ScopeInput(
            name=scope.name,
            memory_limit=scope.memory_limit,
            thresholds=scope.thresholds,
            readings=readings,
            commandable=scope.attached,
            is_worker=scope.kind is ScopeKind.WORKER,
            supervised=scope.supervised,
            can_spill=scope.data.can_spill,
        )

    def _evaluate(self, scope: Scope, readings: MemoryReadings, now: float) -> None:
        """Decide for one scope and act; never waits."""
        scope_input = self._input(scope, readings)
        decisions, memo = decide(scope_input, scope.memo, now, self.settings)
        if memo != scope.memo:
            scope.memo = memo
        for decision in decisions:
            self.apply(scope, decision)
        if self.control.reports_rss(scope):  # the lines are for those alone
            scope.lines = watch_lines(scope_input, memo, self.settings)
            self.control.watch(scope, scope.lines)

    def apply(self, scope: Scope, decision: Decision) -> None:
        match decision:
            case Spill(nbytes=nbytes, reason=reason, readings=readings):
                if scope.name not in self._spills:  # else the next tick decides again
                    task = asyncio.create_task(self._spill(scope, nbytes, reason, readings))
                    self._spills[scope.name] = task
                    task.add_done_callback(lambda _: self._spills.pop(scope.name, None))
            case Pause(reason=reason, readings=readings):
                self.events.record("pause", scope.name, reason, readings)
                self.control.pause(scope.name, reason, readings)
            case Resume(reason=reason, readings=readings):
                self.events.record("resume", scope.name, reason, readings)
                self.control.resume(scope.name, reason, readings)
            case Terminate(reason=reason, readings=readings):
                self.events.record(
                    "terminate", scope.name, reason, readings, supervised=scope.supervised
                )
                # A supervised worker gets up to terminate-grace to exit: don't hold the tick.
                task = asyncio.create_task(self.control.terminate(scope.name, reason, readings))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            case Report(reason=reason):
                logger.warning("Scope %r: %s", scope.name, reason)

    async def _spill(
        self, scope: Scope, nbytes: int, reason: str, readings: MemoryReadings
    ) -> None:
        try:
            result = await self.core.spill(scope, nbytes, readings.managed)
        except Exception:
            logger.exception("Spilling scope %r failed; the next tick tries again", scope.name)
            return
        if result.values_moved:
            self.events.record(
                "spill",
                scope.name,
                reason,
                readings,
                bytes=result.bytes_moved,
                values=result.values_moved,
            )
