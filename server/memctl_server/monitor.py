"""The monitor: every ``monitor-interval``, sample memory, ask the engine, act.

Sampling and acting are I/O (psutil, the store thread, worker streams); the rules
are in ``engine.py``, which this module feeds and obeys. Dask's equivalent is the
worker's memory monitor, run every 200 ms.
"""

from __future__ import annotations

import asyncio
import logging
import time

from .control import ControlPlane
from .core import MemoryService
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
)
from .events import EventLog
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
        self._background: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Tick until cancelled; a failing tick is logged, never fatal."""
        while True:
            try:
                await self.tick()
            except Exception:
                logger.exception("Memory monitor tick failed; trying again next interval")
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        now = time.monotonic()
        for snap in self.core.snapshot(record=True):
            scope = snap.scope
            scope_input = ScopeInput(
                name=scope.name,
                memory_limit=scope.memory_limit,
                thresholds=scope.thresholds,
                readings=snap.readings,
                commandable=scope.attached,
                is_worker=scope.kind is ScopeKind.WORKER,
                supervised=scope.supervised,
                can_spill=scope.data.can_spill,
            )
            decisions, scope.memo = decide(scope_input, scope.memo, now, self.settings)
            for decision in decisions:
                await self.apply(scope, decision)
        await self.control.release_expired(now)

    async def apply(self, scope: Scope, decision: Decision) -> None:
        match decision:
            case Spill(nbytes=nbytes, reason=reason, readings=readings):
                result = await self.core.spill(scope, nbytes, readings.managed)
                if result.values_moved:
                    self.events.record(
                        "spill",
                        scope.name,
                        reason,
                        readings,
                        bytes=result.bytes_moved,
                        values=result.values_moved,
                    )
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
