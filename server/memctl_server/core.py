"""The service's domain object: scopes, the store thread, and the operations on them.

The gRPC servicers in ``service.py`` decode a request, call one method here, and
encode the answer; policy lives here. Every operation that may touch the disk runs
on the single store thread, so the event loop never blocks on I/O
(dask/distributed#4424) and the store never sees two threads at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, ParamSpec, TypeVar

import psutil

from memctl import __version__
from memctl.protocol import SERVICE_SCOPE, key_problem, metadata_problem
from memctl.results import TrimResult
from memctl.trim import trim

from .errors import InvalidArgument
from .readings import MemoryReadings
from .engine import Thresholds
from .scopes import EvictResult, KeyInfo, Scope, ScopeKind
from .store import Compression, SpillBudget, Value

logger = logging.getLogger(__name__)

#: Most keys in one ListKeys page.
MAX_PAGE = 1000

P = ParamSpec("P")
R = TypeVar("R")


@dataclass(frozen=True)
class ServiceSettings:
    """What the core needs from the configuration, already resolved."""

    memory_limit: int | None
    total_memory: int
    thresholds: Thresholds
    spill_directory: Path
    max_spill: int | Literal[False]
    compression: Compression
    monitor_interval: float
    recent_to_old_time: float


@dataclass(frozen=True)
class ScopeSnapshot:
    scope: Scope
    readings: MemoryReadings
    keys_in_memory: int
    keys_on_disk: int


class MemoryService:
    """Owns every scope and runs their operations on the store thread."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.started = time.monotonic()
        self.process = psutil.Process()
        self.budget = SpillBudget(settings.max_spill)
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="memctl-store")
        self.service_scope = self._new_scope(
            SERVICE_SCOPE, ScopeKind.SERVICE, settings.memory_limit
        )
        self.scopes: dict[str, Scope] = {SERVICE_SCOPE: self.service_scope}

    def _new_scope(self, name: str, kind: ScopeKind, memory_limit: int | None) -> Scope:
        # Worker ids are user input: never part of a path.
        directory = self.settings.spill_directory / f"{kind.value}-{os.urandom(6).hex()}"
        return Scope(
            name,
            kind=kind,
            memory_limit=memory_limit,
            thresholds=self.settings.thresholds,
            directory=directory,
            budget=self.budget,
            compression=self.settings.compression,
            recent_to_old_time=self.settings.recent_to_old_time,
        )

    async def _on_store_thread(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_thread, lambda: func(*args, **kwargs))

    def scope_for(self, session_id: str | None) -> Scope:
        """The scope a call's data belongs to: the service's own, for now."""
        return self.service_scope

    # --- data plane -------------------------------------------------------------------
    async def check_put(self, scope: Scope, key: str, size: int, metadata: bytes) -> None:
        """Refuse a Put before any data arrives: bad key or metadata, or no room."""
        problem = key_problem(key) or metadata_problem(metadata)
        if problem:
            raise InvalidArgument(problem)
        await self._on_store_thread(scope.admit, size)

    async def put(
        self, scope: Scope, key: str, value: Value, metadata: bytes
    ) -> Literal["memory", "disk"]:
        return await self._on_store_thread(scope.put, key, value, metadata)

    async def get(self, scope: Scope, key: str) -> tuple[Value, bytes, Literal["memory", "disk"]]:
        _check_key(key)
        return await self._on_store_thread(scope.get, key)

    async def stat(self, scope: Scope, key: str) -> KeyInfo:
        _check_key(key)
        return await self._on_store_thread(scope.stat, key)

    async def list_keys(
        self, scope: Scope, *, prefix: str, page_size: int, page_token: str
    ) -> tuple[list[KeyInfo], str]:
        """One page of keys and the token for the next ("" on the last page)."""
        size = min(page_size or MAX_PAGE, MAX_PAGE)
        page = await self._on_store_thread(scope.list_keys, prefix, page_token, size + 1)
        if len(page) > size:
            return page[:size], page[size - 1].key
        return page, ""

    async def evict(
        self, scope: Scope, *, keys: Sequence[str], nbytes: int, everything: bool
    ) -> EvictResult:
        given = sum((bool(keys), nbytes > 0, everything))
        if given != 1:
            raise InvalidArgument(
                "say what to evict: keys, a number of bytes, or all (exactly one of them)"
            )
        for key in keys:
            _check_key(key)
        return await self._on_store_thread(
            scope.evict, keys=keys, nbytes_wanted=nbytes, everything=everything
        )

    async def delete(self, scope: Scope, keys: Sequence[str]) -> int:
        if not keys:
            raise InvalidArgument("name at least one key to delete")
        for key in keys:
            _check_key(key)
        return await self._on_store_thread(scope.delete, keys)

    # --- readings -----------------------------------------------------------------------
    def rss(self) -> int:
        return int(self.process.memory_info().rss)

    def process_memory(self, scope: Scope, rss: int) -> int:
        """What a scope costs the host. Service scope: own RSS minus workers' managed."""
        workers_managed = sum(s.managed for s in self.scopes.values() if s is not scope)
        return max(rss - workers_managed, 0)

    def snapshot(self) -> list[ScopeSnapshot]:
        """Every scope's readings now, the service scope first."""
        now, rss = time.monotonic(), self.rss()
        return [
            ScopeSnapshot(
                scope,
                scope.readings(process=self.process_memory(scope, rss), now=now),
                len(scope.data.fast),
                len(scope.data.slow),
            )
            for scope in self.scopes.values()
        ]

    def sample(self) -> None:
        """One monitor tick: record every scope's unmanaged memory."""
        now, rss = time.monotonic(), self.rss()
        for scope in self.scopes.values():
            scope.record(process=self.process_memory(scope, rss), now=now)

    async def monitor(self) -> None:
        """Sample every ``monitor-interval`` until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(self.settings.monitor_interval)

    async def trim(self) -> TrimResult:
        return await asyncio.to_thread(trim)

    def uptime(self) -> float:
        return time.monotonic() - self.started

    @property
    def version(self) -> str:
        return __version__

    def close(self) -> None:
        self._store_thread.shutdown(wait=True, cancel_futures=True)


def _check_key(key: str) -> None:
    problem = key_problem(key)
    if problem:
        raise InvalidArgument(problem)
