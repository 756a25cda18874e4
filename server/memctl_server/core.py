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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

import psutil

from memctl import __version__
from memctl.protocol import SERVICE_SCOPE, key_problem, metadata_problem
from memctl.results import TrimResult
from memctl.trim import trim

from .engine import Thresholds
from .errors import FailedPrecondition, InvalidArgument
from .events import EventLog
from .plugin import ForeignStore, load_factory
from .readings import MemoryReadings
from .scopes import EvictResult, KeyInfo, Scope, ScopeKind, ScopeStore, StoreSizes, target_bytes
from .store import Compression, SpillBudget, SpillBuffer, Value

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
    #: "package.module:callable" for a user-supplied store, and its keyword arguments.
    store_factory: str | None = None
    store_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ScopeSnapshot:
    scope: Scope
    readings: MemoryReadings
    sizes: StoreSizes


class MemoryService:
    """Owns every scope and runs their operations on the store thread."""

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.started = time.monotonic()
        self.process = psutil.Process()
        self.budget = SpillBudget(settings.max_spill)
        self.events = EventLog()
        self._store_factory = (
            load_factory(settings.store_factory) if settings.store_factory else None
        )
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="memctl-store")
        self.service_scope = self._new_scope(
            SERVICE_SCOPE, ScopeKind.SERVICE, settings.memory_limit
        )
        self.scopes: dict[str, Scope] = {SERVICE_SCOPE: self.service_scope}
        #: Session id -> worker scope name, valid as long as the scope exists.
        self.sessions: dict[str, str] = {}

    def _new_scope(self, name: str, kind: ScopeKind, memory_limit: int | None) -> Scope:
        target = target_bytes(memory_limit, self.settings.thresholds)
        data: ScopeStore
        if self._store_factory is not None:
            data = ForeignStore(self._store_factory(**self.settings.store_kwargs), target, name)
        else:
            # Worker ids are user input: never part of a path.
            directory = self.settings.spill_directory / f"{kind.value}-{os.urandom(6).hex()}"
            data = SpillBuffer(
                directory, target, budget=self.budget, compression=self.settings.compression
            )
        return Scope(
            name,
            kind=kind,
            memory_limit=memory_limit,
            thresholds=self.settings.thresholds,
            data=data,
            recent_to_old_time=self.settings.recent_to_old_time,
        )

    async def _on_store_thread(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_thread, lambda: func(*args, **kwargs))

    def scope_for(self, session_id: str | None) -> Scope:
        """The scope a call's data belongs to: its worker's, or the service's own."""
        if session_id is None:
            return self.service_scope
        name = self.sessions.get(session_id)
        if name is None or name not in self.scopes:
            raise FailedPrecondition(
                "unknown or expired memctl session; attach again (a worker's data is kept "
                "for control.retention after its stream breaks)"
            )
        return self.scopes[name]

    # --- worker scopes ------------------------------------------------------------------
    async def open_worker_scope(
        self, worker_id: str, memory_limit: int | None, session_id: str
    ) -> tuple[Scope, bool]:
        """The worker's scope, new or kept from an earlier session; whether it was kept."""
        scope = self.scopes.get(worker_id)
        kept = scope is not None
        if scope is None:
            scope = self._new_scope(worker_id, ScopeKind.WORKER, memory_limit)
            self.scopes[worker_id] = scope
        elif scope.memory_limit != memory_limit:
            await self._on_store_thread(scope.set_memory_limit, memory_limit)
        self.sessions[session_id] = worker_id
        return scope, kept

    async def release_scope(self, scope: Scope) -> None:
        """Forget a worker scope and all its values (its retention time passed)."""
        self.scopes.pop(scope.name, None)
        for session_id in [s for s, name in self.sessions.items() if name == scope.name]:
            del self.sessions[session_id]
        await self._on_store_thread(scope.delete, list(scope.entries))

    # --- data plane -------------------------------------------------------------------
    async def check_put(self, scope: Scope, key: str, size: int, metadata: bytes) -> None:
        """Refuse a Put before any data arrives: bad key or metadata, or no room."""
        _check_key(key)
        problem = metadata_problem(metadata)
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
        if page_size > MAX_PAGE:
            raise InvalidArgument(
                f"page_size is {page_size}; ask for at most {MAX_PAGE} keys a page "
                f"(0 means {MAX_PAGE}) and follow next_page_token"
            )
        size = page_size or MAX_PAGE
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

    def process_memory(self, scope: Scope, service_rss: int) -> int:
        """What a scope costs the host (PRODUCT.md, "Readings").

        Worker: its RSS (self-reported, else measured by PID) + its managed bytes held
        here. Service: the service's RSS minus the worker scopes' managed bytes.
        """
        if scope.kind is ScopeKind.SERVICE:
            workers = sum(s.managed for s in self.scopes.values() if s is not scope)
            return max(service_rss - workers, 0)
        return worker_rss(scope) + scope.managed

    def snapshot(self, *, record: bool = False) -> list[ScopeSnapshot]:
        """Every scope's readings now, the service scope first.

        ``record``: the monitor's tick, whose samples feed "unmanaged" (Status and
        metrics only look).
        """
        now, rss = time.monotonic(), self.rss()
        read = Scope.record if record else Scope.readings
        return [
            ScopeSnapshot(
                scope, read(scope, process=self.process_memory(scope, rss), now=now), scope.sizes
            )
            for scope in list(self.scopes.values())
        ]

    async def spill(self, scope: Scope, nbytes: int) -> EvictResult:
        """Move ``nbytes`` of the scope's least recently used values to disk."""
        return await self._on_store_thread(scope.evict, nbytes_wanted=nbytes)

    async def trim(self) -> TrimResult:
        result = await asyncio.to_thread(trim)
        self.events.record(
            "trim",
            SERVICE_SCOPE,
            result.detail,
            rss_before=result.rss_before,
            rss_after=result.rss_after,
        )
        return result

    def uptime(self) -> float:
        return time.monotonic() - self.started

    @property
    def version(self) -> str:
        return __version__

    def close(self) -> None:
        self._store_thread.shutdown(wait=True, cancel_futures=True)


def worker_rss(scope: Scope) -> int:
    """A worker's RSS: what it reports, else what its PID shows, else 0 (gone)."""
    if scope.reported_rss is not None:
        return scope.reported_rss
    if not scope.attached or scope.pid <= 0:
        return 0
    try:
        return int(psutil.Process(scope.pid).memory_info().rss)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return 0


def _check_key(key: str) -> None:
    problem = key_problem(key)
    if problem:
        raise InvalidArgument(problem)
