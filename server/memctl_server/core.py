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
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Literal, ParamSpec, TypeVar

import psutil

import memctl.chunks
from memctl import __version__
from memctl.protocol import (
    CHUNK_SIZE,
    MAX_INLINE_VALUE,
    MESSAGE_BUDGET,
    SERVICE_SCOPE,
    key_problem,
    metadata_problem,
)
from memctl.results import TrimResult
from memctl.sizes import format_bytes
from memctl.trim import trim

from .engine import Thresholds
from .errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    ResourceExhausted,
)
from .events import EventLog
from .persist import Journal, count_lost, find_values
from .plugin import ForeignStore, load_factory
from .readings import MemoryReadings
from .scopes import (
    EvictResult,
    KeyInfo,
    ManyRead,
    Route,
    Scope,
    ScopeKind,
    ScopeStore,
    StoreSizes,
    ValueRead,
    target_bytes,
)
from .segments import LEDGER, Segment, new_segment
from .spillfile import SpillFileDamaged, SpillReader, SpillWriter, checksum, header_length
from .store import Compression, SpillBudget, SpillBuffer, SpillFailed, Value, nbytes

logger = logging.getLogger(__name__)

#: Most keys in one ListKeys page.
MAX_PAGE = 1000
#: Chunks of a value streamed to or from disk that one hop to the store thread writes
#: or reads (streaming in, twice this many are held at most: one hop's being written,
#: the next one's arriving).
CHUNKS_PER_HOP = 4

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
    #: Seconds a Put may wait for room before RESOURCE_EXHAUSTED.
    put_wait: float = 5.0
    #: The largest value a Put may store (``limits.max-value-size``); False: no cap.
    max_value_size: int | Literal[False] = False
    #: Keep values across restarts (``spill_directory`` is then fixed, not temporary).
    persist: bool = False
    #: "package.module:callable" for a user-supplied store, and its keyword arguments.
    store_factory: str | None = None
    store_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PipelineCounts:
    """Pipeline traffic since start (event loop writes, metrics read): operations per
    message is how well clients' calls are being coalesced."""

    messages: int = 0
    operations: int = 0


@dataclass
class SameHostCounts:
    """Same-host channel traffic (event loop writes, metrics read)."""

    connections: int = 0
    operations: int = 0


@dataclass(frozen=True)
class ScopeSnapshot:
    """One scope's readings at one moment. Readers off the event loop use ``scope``
    only for what it publishes whole (``name``, ``state``, ``memory_limit``...)."""

    scope: Scope
    readings: MemoryReadings
    sizes: StoreSizes


class MemoryService:
    """Owns every scope and runs their operations on the store thread.

    The event loop alone changes ``scopes`` and ``sessions``; after each change it
    publishes ``scope_list``, an immutable tuple that ``snapshot()`` (called from
    metrics exporter threads too) iterates instead of the dict.
    """

    def __init__(self, settings: ServiceSettings):
        self.settings = settings
        self.started = time.monotonic()
        self.process = psutil.Process()
        #: This daemon's RSS as the monitor last read it.
        self.service_rss = int(self.process.memory_info().rss)
        self.budget = SpillBudget(settings.max_spill)
        self.events = EventLog()
        self.pipeline = PipelineCounts()
        self.same_host = SameHostCounts()
        self._store_factory = (
            load_factory(settings.store_factory) if settings.store_factory else None
        )
        self._store_thread = ThreadPoolExecutor(1, thread_name_prefix="memctl-store")
        #: Spills after Puts that went over a target (``_settle_later``).
        self._settling: set[asyncio.Task[None]] = set()
        #: Operations that stay in RAM may run on the event loop (``_owned``).
        self._inline = self._store_factory is None and not settings.persist
        self.journal: Journal | None = None
        if settings.persist:
            if self._store_factory is not None:
                raise FailedPrecondition(
                    "persist: true needs the built-in store; remove store.factory or persist"
                )
            self.journal = Journal(settings.spill_directory, self._live_values)
        self.service_scope = self._new_scope(
            SERVICE_SCOPE, ScopeKind.SERVICE, settings.memory_limit
        )
        self.scopes: dict[str, Scope] = {SERVICE_SCOPE: self.service_scope}
        #: The scopes, service first; replaced whole whenever one is added or removed.
        self.scope_list: tuple[Scope, ...] = (self.service_scope,)
        if self.journal is not None:
            self._restore(self.journal)
        #: Session id -> worker scope name, valid as long as the scope exists.
        self.sessions: dict[str, str] = {}
        #: Set (and replaced) whenever room may have come back, for waiting Puts.
        self._room = asyncio.Event()

    def _new_scope(self, name: str, kind: ScopeKind, memory_limit: int | None) -> Scope:
        target = target_bytes(memory_limit, self.settings.thresholds)
        data: ScopeStore
        if self._store_factory is not None:
            data = ForeignStore(self._store_factory(**self.settings.store_kwargs), target, name)
        else:
            # Worker ids are user input: never part of a path.
            directory = self.settings.spill_directory / f"{kind.value}-{os.urandom(6).hex()}"
            data = SpillBuffer(
                directory,
                target,
                budget=self.budget,
                compression=self.settings.compression,
                scope=name,
            )
        return Scope(
            name,
            kind=kind,
            memory_limit=memory_limit,
            thresholds=self.settings.thresholds,
            data=data,
            recent_to_old_time=self.settings.recent_to_old_time,
            journal=self.journal,
        )

    # --- persistence (persist: true) ----------------------------------------------------
    def _restore(self, journal: Journal) -> None:
        """Serve again what a previous daemon left on disk: the service's values, and
        worker scopes kept (detached) for their workers to attach again."""
        directory = self.settings.spill_directory
        recovered = find_values(directory)
        count_lost(recovered, journal)
        now = time.monotonic()
        for name, files in recovered.scopes.items():
            scope = self.scopes.get(name)
            if scope is None:
                # A worker's limit comes with its next hello; until then none.
                scope = self._new_scope(name, ScopeKind.WORKER, None)
                scope.detached_since = now
                self._add_scope(scope)
            scope.restore(files)
        journal.rewrite(self._live_values())
        total = sum(f.header.size for files in recovered.scopes.values() for f in files.values())
        logger.info(
            "Restored %d values (%s) in %d scope%s from %s",
            recovered.values,
            format_bytes(total),
            len(recovered.scopes),
            "" if len(recovered.scopes) == 1 else "s",
            directory,
        )
        if recovered.lost or recovered.damaged:
            logger.error(
                "%d values were lost: %d were only in RAM when the previous memctl stopped "
                "without writing them to disk (killed or crashed), %d had damaged spill files",
                recovered.lost + recovered.damaged,
                recovered.lost,
                recovered.damaged,
            )

    def _live_values(self) -> set[tuple[str, str]]:
        """Every (scope, key) stored now (store thread, or before serving)."""
        return {(scope.name, key) for scope in self.scope_list for key in scope.data}

    async def write_all_to_disk(self) -> None:
        """At shutdown with persist: move every value in RAM to disk, so the next start
        serves them all; one log line for any that could not be written."""
        unwritten = 0
        for scope in self.scope_list:
            result = await self._in_scope(scope, scope.evict, everything=True)
            if result.error:
                unwritten += scope.sizes.keys_in_memory
                logger.error("Scope %r: %s", scope.name, result.error)
        if self.journal is not None:
            await self._on_store_thread(self._close_journal, self.journal)
        if unwritten:
            logger.error("%d values could not be written to disk and are lost", unwritten)
        logger.info("Every value is on disk in %s", self.settings.spill_directory)

    def _close_journal(self, journal: Journal) -> None:
        journal.rewrite(self._live_values())
        journal.close()

    async def _on_store_thread(self, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
        """Run ``func`` on the store thread: for what touches no scope's state."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._store_thread, lambda: func(*args, **kwargs))

    async def _in_scope(
        self, scope: Scope, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs
    ) -> R:
        """Run a store operation on ``scope`` on the store thread, holding its lock."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._store_thread, lambda: _locked(scope, func, *args, **kwargs)
        )

    @contextmanager
    def _owned(self, scope: Scope) -> Iterator[bool]:
        """Whether the event loop may act on ``scope`` itself, now: for operations that
        stay in RAM (no disk I/O), which then skip two thread hand-offs. Only with the
        built-in store (a user's store may do I/O anywhere) and without the journal
        (shared by every scope), and only while the store thread is not working on the
        scope (its lock is free)."""
        if not self._inline or not scope.lock.acquire(blocking=False):
            yield False
            return
        try:
            yield True
        finally:
            scope.lock.release()

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

    def scope_named(self, name: str) -> Scope:
        """A scope by name, for an admin naming one (``memctl-scope``)."""
        scope = self.scopes.get(name)
        if scope is None:
            raise FailedPrecondition(
                f"there is no scope named {name!r}; memctl status lists the scopes"
            )
        return scope

    # --- worker scopes ------------------------------------------------------------------
    def _add_scope(self, scope: Scope) -> None:
        self.scopes[scope.name] = scope
        self._publish_scopes()

    def _publish_scopes(self) -> None:
        """Replace ``scope_list`` whole after ``scopes`` changed (event loop only)."""
        self.scope_list = tuple(self.scopes.values())

    async def open_worker_scope(
        self, worker_id: str, memory_limit: int | None, session_id: str
    ) -> tuple[Scope, bool]:
        """The worker's scope, new or kept from an earlier session; whether it was kept."""
        scope = self.scopes.get(worker_id)
        kept = scope is not None
        if scope is None:
            scope = self._new_scope(worker_id, ScopeKind.WORKER, memory_limit)
            self._add_scope(scope)
        elif scope.memory_limit != memory_limit:
            await self._in_scope(scope, scope.set_memory_limit, memory_limit)
        self.sessions[session_id] = worker_id
        return scope, kept

    async def release_scope(self, scope: Scope) -> None:
        """Forget a worker scope and all its values (its retention time passed)."""
        self.scopes.pop(scope.name, None)
        self._publish_scopes()
        for session_id in [s for s, name in self.sessions.items() if name == scope.name]:
            del self.sessions[session_id]
        await self._in_scope(scope, scope.clear)

    # --- data plane -------------------------------------------------------------------
    async def put(
        self,
        scope: Scope,
        request: PutRequest,
        chunks: AsyncIterator[Value],
        *,
        wait: float,
        segment: Segment | None = None,
    ) -> Route:
        """Receive a value and store it; where it went. A ``segment`` (same-host
        channel) is stored as it is if it goes to RAM; ``chunks`` are its pieces.

        Room is reserved before any data arrives (``Scope.route``): in RAM, the bytes
        are collected as they arrive; on disk, they are streamed into the spill file
        and never held whole. With no room now, waits up to ``wait`` seconds for some.
        The value becomes visible only once complete and checked; a failed, short or
        cancelled Put leaves nothing behind and the old value intact.
        """
        self.check_value(request.key, request.metadata, request.size)
        header_size = header_length(scope.name, request.key, request.metadata, request.size)
        route = await self._reserve(scope, request.size, header_size, wait)
        try:
            if route == "memory":
                data: Value
                if segment is not None:
                    data, crc = segment, 0  # its CRC is computed when first needed
                else:
                    data, crc = await _receive(request, chunks)
                moved = await self._in_scope(
                    scope,
                    _spills_during,
                    scope,
                    scope.put,
                    request.key,
                    data,
                    crc,
                    request.metadata,
                )
                location: Route = moved.result
                cause = "took the scope's managed memory over its target"
            else:
                await self._stream_to_disk(scope, request, chunks)
                moved = Moved(route, 1, request.size)
                location = "disk"
                cause = (
                    "went straight to disk: it is larger than the target share"
                    if request.size > scope.data.target
                    else "went straight to disk: no room in RAM"
                )
        finally:
            # No await here: this runs on cancellation too.
            loop = asyncio.get_running_loop()
            self._store_thread.submit(
                _locked, scope, scope.release, route, request.size, header_size
            ).add_done_callback(lambda _: _call_soon(loop, self.room_changed))
        reason = f"Put of {request.key!r} ({format_bytes(request.size)}) {cause}"
        if moved.values:
            self._record_spill(scope, reason, moved)
        self._settle_later(scope, reason)
        return location

    async def put_segment(
        self, scope: Scope, key: str, metadata: bytes, segment: Segment, *, wait: float
    ) -> Route:
        """Store a shared-memory segment as a value: the segment itself when it goes to
        RAM with the built-in store, else its bytes (written to disk, or to a user's
        store)."""
        request = PutRequest(key, len(segment), metadata)
        keep = segment if self._store_factory is None else None
        return await self.put(scope, request, _pieces(segment), wait=wait, segment=keep)

    async def share(
        self, scope: Scope, key: str, threshold: int
    ) -> tuple[ValueRead, Segment | None]:
        """A value for a same-host Get: a value of ``threshold`` bytes or more as a
        segment (the one it is stored as, or one made now and stored instead of its
        bytes, so the next Get costs nothing); smaller ones, and all with a user's
        store, as ``get`` reads them."""
        if self._store_factory is not None:
            return await self.get(scope, key), None
        return await self._read(scope, key, scope.share, key, threshold)

    async def segment_of(self, scope: Scope, key: str, reader: SpillReader, size: int) -> Segment:
        """A value streamed from its spill file into a new segment, checked whole
        (DataLoss if the file is damaged): for a same-host Get of a value too large
        for RAM."""
        try:
            return await self._on_store_thread(new_segment, _read_all(reader), size)
        except SpillFileDamaged as exc:
            loss = await self._in_scope(scope, scope.lose, key, str(exc), reader.path)
            self._record_loss(scope, loss)
            raise loss from None
        finally:
            self.close_reader(reader)

    async def put_many(
        self, scope: Scope, items: Sequence[InlineValue], *, wait: float
    ) -> list[Route]:
        """Store several whole values at once; where each went. All or nothing: every
        item is checked, and room found for them all, before any is stored. One hop
        to the store thread for the lot, which is what makes batches cheap."""
        if not items:
            raise InvalidArgument("PutMany with no items; send at least one value")
        stored = self.put_many_now(scope, items)
        if stored is not None:
            return stored
        deadline = time.monotonic() + wait
        while True:
            moved = await self._in_scope(scope, _spills_during, scope, _put_batch, scope, items)
            if moved.result is not None:
                break
            # No room for the batch now: wait as a Put does, then try again.
            await self._wait_for_room(deadline, wait, scope, sum(len(i.data) for i in items))
        reason = f"PutMany of {len(items)} values took the scope over its target"
        if moved.values:
            self._record_spill(scope, reason, moved)
        self._settle_later(scope, reason)
        return moved.result

    def put_many_now(self, scope: Scope, items: Sequence[InlineValue]) -> list[Route] | None:
        """``put_many`` without leaving the event loop, when the items fit in RAM with
        nothing to spill; None (nothing stored, the items checked) when they need the
        store thread. Raises for bad items."""
        if not items:
            raise InvalidArgument("PutMany with no items; send at least one value")
        for index, item in enumerate(items):
            try:
                self._check_inline(item)
            except (InvalidArgument, ResourceExhausted, DataLoss) as exc:
                raise type(exc)(
                    f"item {index} of {len(items)}: {exc}; nothing was stored"
                ) from None
        with self._owned(scope) as owned:
            return _put_in_ram(scope, items) if owned else None

    def _settle_later(self, scope: Scope, reason: str) -> None:
        """Spill what a Put took over the target, behind its answer, not in front of it."""
        if scope.managed <= scope.data.target:
            return
        task = asyncio.create_task(self._settle(scope, reason))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def _settle(self, scope: Scope, reason: str) -> None:
        moved = await self._in_scope(scope, _spills_during, scope, scope.settle)
        if moved.values:
            self._record_spill(scope, reason, moved)
        self.room_changed()

    def check_value(self, key: str, metadata: bytes, size: int, label: str = "Put of ") -> None:
        """What Put and PutMany check of a value before taking it: the key, the
        metadata, and ``limits.max-value-size``; messages name it ``<label><key>``."""
        _check_key(key)
        problem = metadata_problem(metadata)
        if problem:
            raise InvalidArgument(f"{label}{key!r}: {problem}")
        most = self.settings.max_value_size
        if most is not False and size > most:
            raise ResourceExhausted(
                f"{label}{key!r}: the value is {format_bytes(size)}, more than the "
                f"{format_bytes(most)} this daemon takes in one value "
                "(limits.max-value-size); split it, or raise the limit"
            )

    def _check_inline(self, item: InlineValue) -> None:
        """Fill in ``item``'s CRC32C; InvalidArgument, ResourceExhausted or DataLoss if
        it is bad."""
        size = len(item.data)
        if size > MAX_INLINE_VALUE:
            raise InvalidArgument(
                f"{item.key!r}: the value is {format_bytes(size)}; values travel whole in "
                f"one message up to {format_bytes(MAX_INLINE_VALUE)}: send it with Put, "
                "which streams it"
            )
        self.check_value(item.key, item.metadata, size, label="")
        crc = checksum(item.data)
        if item.crc is not None and crc != item.crc:
            raise DataLoss(
                f"{item.key!r}: the value's CRC32C is {crc:#010x}, the client's "
                f"{item.crc:#010x}: it was damaged on the way"
            )
        item.crc = crc

    async def get_many(self, scope: Scope, keys: Sequence[str]) -> list[ManyRead]:
        """Several values at once, inline up to ``MESSAGE_BUDGET`` in all; the rest
        marked for Get. A damaged value fails its own item only."""
        in_ram = self.get_many_now(scope, keys)
        if in_ram is not None:
            return in_ram
        return await self.get_many_later(scope, keys)

    def get_many_now(
        self,
        scope: Scope,
        keys: Sequence[str],
        budget: int = MESSAGE_BUDGET,
        most: int = MAX_INLINE_VALUE,
    ) -> list[ManyRead] | None:
        """``get_many`` without leaving the event loop, when every value is in RAM (or
        missing); None when some are on disk. Values over ``most`` bytes, or past
        ``budget`` in all, are only described. Raises for bad keys."""
        if not keys:
            raise InvalidArgument("GetMany with no keys; name at least one")
        for key in keys:
            _check_key(key)
        with self._owned(scope) as owned:
            if owned:
                return scope.read_many(keys, budget, most, ram_only=True)
        return None

    async def get_many_later(
        self,
        scope: Scope,
        keys: Sequence[str],
        budget: int = MESSAGE_BUDGET,
        most: int = MAX_INLINE_VALUE,
    ) -> list[ManyRead]:
        """``get_many`` on the store thread, for keys already checked."""
        moved = await self._in_scope(
            scope, _spills_during, scope, scope.read_many, keys, budget, most
        )
        assert moved.result is not None  # only ram_only reads give up
        for read in moved.result:
            if read.failure is not None:
                self._record_loss(scope, read.failure)
        if moved.values:
            self._record_spill(
                scope, f"GetMany of {len(keys)} values brought some back to RAM", moved
            )
        return moved.result

    async def _reserve(self, scope: Scope, size: int, header_size: int, wait: float) -> Route:
        """Reserve room for a Put, waiting up to ``wait`` seconds for some (backpressure)."""
        deadline = time.monotonic() + wait
        while True:
            route = await self._in_scope(scope, scope.route, size, header_size)
            if route is not None:
                return route
            await self._wait_for_room(deadline, wait, scope, size)

    async def _wait_for_room(self, deadline: float, wait: float, scope: Scope, size: int) -> None:
        """Wait until room may have come back; ResourceExhausted once ``deadline`` passed."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ResourceExhausted(
                await self._in_scope(scope, scope.no_room, size)
                + f" (waited {wait:.1f} s; memory.put-wait)"
            )
        # Room comes back when values are deleted, spilled or finish arriving; the
        # monitor's tick is the slowest of those, so poll at least that often.
        with suppress(TimeoutError):
            await asyncio.wait_for(
                self._room.wait(), min(remaining, self.settings.monitor_interval)
            )

    def room_changed(self) -> None:
        """Wake Puts waiting for room (event loop only)."""
        self._room.set()
        self._room = asyncio.Event()

    async def _stream_to_disk(
        self, scope: Scope, request: PutRequest, chunks: AsyncIterator[Value]
    ) -> None:
        """Write a value into its spill file as it arrives, a few chunks a hop to the
        store thread, each hop's chunks written while the next ones arrive."""
        writer: SpillWriter | None = None
        committed = False
        writing: asyncio.Future[None] | None = None
        try:
            writer = await self._in_scope(scope, scope.open_writer, request.key, request.metadata)
            received = 0
            batch: list[Value] = []
            async for chunk in chunks:
                received = _check_chunk(request, received, chunk)
                batch.append(chunk)
                if len(batch) == CHUNKS_PER_HOP:
                    if writing is not None:
                        await writing
                    writing = asyncio.get_running_loop().run_in_executor(
                        self._store_thread, _write_all, writer, batch
                    )
                    batch = []
            if writing is not None:
                await writing
            await self._on_store_thread(_write_all, writer, batch)
            _check_whole(request, received, writer.crc)
            await self._in_scope(scope, scope.adopt, request.key, writer)
            committed = True
        except OSError as exc:
            raise ResourceExhausted(
                f"Put of {request.key!r}: writing it to disk failed ({exc.strerror or exc}); "
                f"nothing was stored. {scope.data.describe_disk()}"
            ) from None
        except SpillFailed as exc:
            raise ResourceExhausted(f"Put of {request.key!r}: {exc}; nothing was stored") from None
        finally:
            if writer is not None and not committed:
                if writing is not None:
                    writing.cancel()  # unless running: the abort then waits for it
                self._store_thread.submit(writer.abort)

    async def get(self, scope: Scope, key: str) -> ValueRead:
        """A value for Get: whole, or a checked stream from its spill file (``read_pieces``)."""
        return await self._read(scope, key, scope.read, key)

    async def _read(self, scope: Scope, key: str, read: Callable[..., R], *args: Any) -> R:
        """``read(*args)`` in ``scope`` for a Get of ``key``: a loss it finds recorded,
        and what bringing the value back to RAM pushed out."""
        _check_key(key)
        try:
            moved: Moved[R] = await self._in_scope(scope, _spills_during, scope, read, *args)
        except DataLoss as exc:
            self._record_loss(scope, exc)
            raise
        if moved.values:
            self._record_spill(
                scope, f"Get of {key!r} brought it back to RAM, over the target", moved
            )
        return moved.result

    async def read_pieces(self, scope: Scope, key: str, reader: SpillReader) -> list[bytes]:
        """The next pieces of a value streamed from disk, a few a hop to the store thread;
        none once it is whole and checked. DataLoss if the file is damaged."""
        try:
            return await self._on_store_thread(_read_some, reader, CHUNKS_PER_HOP)
        except SpillFileDamaged as exc:
            self._store_thread.submit(reader.close)
            loss = await self._in_scope(scope, scope.lose, key, str(exc), reader.path)
            self._record_loss(scope, loss)
            raise loss from None

    def close_reader(self, reader: SpillReader) -> None:
        self._store_thread.submit(reader.close)

    def _record_spill(self, scope: Scope, reason: str, moved: Moved[Any]) -> None:
        self.events.record(
            "spill",
            scope.name,
            reason,
            self.readings_now(scope),
            bytes=moved.bytes,
            values=moved.values,
        )

    def _record_loss(self, scope: Scope, loss: DataLoss) -> None:
        self.events.record("data_loss", scope.name, str(loss), self.readings_now(scope))

    async def stat(self, scope: Scope, key: str) -> KeyInfo:
        info = self.stat_now(scope, key)
        if info is not None:
            return info
        return await self._in_scope(scope, scope.stat, key)

    def stat_now(self, scope: Scope, key: str) -> KeyInfo | None:
        """``stat`` on the event loop when the store thread is not busy with the scope;
        None otherwise. Raises NotFound, InvalidArgument."""
        _check_key(key)
        with self._owned(scope) as owned:
            if owned:  # reads only what is in RAM
                return scope.stat(key)
        return None

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
        page = await self._in_scope(scope, scope.list_keys, prefix, page_token, size + 1)
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
        result = await self._in_scope(
            scope, scope.evict, keys=keys, nbytes_wanted=nbytes, everything=everything
        )
        if result.values_moved:
            self._record_spill(
                scope,
                "an Evict call",
                Moved(None, result.values_moved, result.bytes_moved),
            )
            self.room_changed()
        return result

    async def delete(self, scope: Scope, keys: Sequence[str]) -> int:
        deleted = self.delete_now(scope, keys)
        if deleted is None:
            deleted = await self._in_scope(scope, scope.delete, keys)
            self.room_changed()
        return deleted

    def delete_now(self, scope: Scope, keys: Sequence[str]) -> int | None:
        """``delete`` on the event loop when the keys are in RAM (or missing) and the
        store thread is not busy with the scope; None otherwise."""
        if not keys:
            raise InvalidArgument("name at least one key to delete")
        for key in keys:
            _check_key(key)
        with self._owned(scope) as owned:
            deleted = scope.delete(keys) if owned and _in_ram(scope, keys) else None
        if deleted is not None:
            self.room_changed()
        return deleted

    # --- readings -----------------------------------------------------------------------
    def measure(self) -> None:
        """Read this daemon's memory and publish it (the monitor, once per tick): its
        RSS, with its shared-memory segments counted whole rather than as far as its
        own mappings have touched them."""
        rss = int(self.process.memory_info().rss)
        if LEDGER.count:
            rss = rss - rss_shmem() + LEDGER.bytes
        self.service_rss = rss

    def snapshot(self, *, record: bool = False) -> list[ScopeSnapshot]:
        """Every scope's readings as last measured, the service scope first.

        Any thread: touches only published data (``scope_list``, each scope's
        ``sizes`` and RSS): no process is measured here, so Status and metrics cost
        the same however many workers there are. ``record`` (the monitor's tick, on
        the event loop) also feeds the samples behind "unmanaged"; Status and
        metrics only look.
        """
        now, scopes = time.monotonic(), self.scope_list
        sizes = [scope.sizes for scope in scopes]
        snapshots = []
        for scope, size in zip(scopes, sizes, strict=True):
            process = self._process(scope, size, scopes, sizes)
            if record:
                readings = scope.record(process=process, sizes=size, now=now)
            else:
                readings = scope.readings(process=process, sizes=size)
            snapshots.append(ScopeSnapshot(scope, readings, size))
        return snapshots

    async def spill(self, scope: Scope, nbytes: int, managed_seen: int) -> EvictResult:
        """Move the scope's least recently used values to disk until its managed bytes
        are ``nbytes`` under what the monitor saw (``managed_seen``): what a Put's
        settling spilled meanwhile counts, so nothing is spilled twice."""
        result = await self._in_scope(scope, _spill_down, scope, managed_seen - nbytes)
        self.room_changed()
        return result

    def _process(
        self, scope: Scope, size: StoreSizes, scopes: Sequence[Scope], sizes: Sequence[StoreSizes]
    ) -> int:
        """What the host pays for a scope (PRODUCT.md, "Readings"). Worker: its RSS
        (self-reported, else measured by PID) + its managed bytes held here. Service:
        the service's RSS minus the worker scopes' managed bytes (``scopes`` and their
        ``sizes``, as read together)."""
        if scope is not self.service_scope:
            return worker_rss(scope) + size.managed
        workers = sum(
            s.managed for other, s in zip(scopes, sizes, strict=True) if other is not scope
        )
        return max(self.service_rss - workers, 0)

    def readings_now(self, scope: Scope, *, record_at: float | None = None) -> MemoryReadings:
        """One scope's readings at this moment (for an event, or, ``record_at`` a time,
        a decision on it alone): that scope's only."""
        scopes = self.scope_list
        size = scope.sizes
        process = self._process(scope, size, scopes, [s.sizes for s in scopes])
        if record_at is not None:
            return scope.record(process=process, sizes=size, now=record_at)
        return scope.readings(process=process, sizes=size)

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
    """A worker's RSS: what it reports, else what the monitor last read by its PID,
    else 0 (detached, gone, or not visible here)."""
    reported = scope.reported_rss
    if reported is not None:
        return reported
    return scope.measured_rss or 0


@dataclass(frozen=True)
class PutRequest:
    """A Put's header, decoded: what is coming."""

    key: str
    size: int
    metadata: bytes
    #: The value's CRC32C as the client computed it, if it sent one.
    crc: int | None = None


@dataclass(slots=True)
class InlineValue:
    """One value of a PutMany, whole."""

    key: str
    data: bytes | memoryview
    metadata: bytes
    #: The client's CRC32C if it sent one; once checked (``_check_inline``), the value's.
    crc: int | None = None


def rss_shmem() -> int:
    """Bytes of shared memory counted in this process's RSS (Linux; else 0)."""
    try:
        with open("/proc/self/status", "rb") as status:
            for line in status:
                if line.startswith(b"RssShmem:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


async def _pieces(segment: Segment) -> AsyncIterator[Value]:
    """A segment as Put chunks, views of it (for the disk route)."""
    view = memoryview(segment)
    for start in range(0, len(view), CHUNK_SIZE):
        yield view[start : start + CHUNK_SIZE]


def _read_all(reader: SpillReader) -> Iterator[bytes]:
    while piece := reader.read():
        yield piece


def _spill_down(scope: Scope, goal: int) -> EvictResult:
    """Spill LRU values until the scope's managed bytes are at most ``goal``."""
    wanted = scope.managed - goal
    if wanted <= 0:
        return EvictResult(0, 0)
    return scope.evict(nbytes_wanted=wanted)


def _locked(scope: Scope, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    with scope.lock:
        return func(*args, **kwargs)


def _in_ram(scope: Scope, keys: Sequence[str]) -> bool:
    """Whether none of ``keys`` is on disk (so reading or deleting them needs no I/O)."""
    return all(scope.data.location(key) != "disk" for key in keys)


def _put_in_ram(scope: Scope, items: Sequence[InlineValue]) -> list[Route] | None:
    """Store the items if they fit in RAM under the target with nothing to spill and
    nothing on disk to replace; None (nothing done) otherwise."""
    size = sum(len(item.data) for item in items)
    if scope.managed + scope.incoming + size > scope.data.target:
        return None
    if not _in_ram(scope, [item.key for item in items]):
        return None
    return scope.put_many([(i.key, i.data, i.crc or 0, i.metadata) for i in items])


def _put_batch(scope: Scope, items: Sequence[InlineValue]) -> list[Route] | None:
    """Store every item if there is room for them all (store thread); None if not."""
    size = sum(len(item.data) for item in items)
    header_size = sum(
        header_length(scope.name, item.key, item.metadata, len(item.data)) for item in items
    )
    route = scope.route(size, header_size)
    if route is None:
        return None
    try:
        return scope.put_many([(i.key, i.data, i.crc or 0, i.metadata) for i in items])
    finally:
        scope.release(route, size, header_size)


@dataclass(frozen=True)
class Moved(Generic[R]):
    """What a store operation returned, and the values it moved to disk meanwhile."""

    result: R
    values: int
    bytes: int


def _spills_during(
    scope: Scope, func: Callable[P, R], *args: P.args, **kwargs: P.kwargs
) -> Moved[R]:
    """Run a store operation (store thread) and count what it spilled: every spill is
    an event, whoever caused it."""
    before = scope.data.counters
    result = func(*args, **kwargs)
    after = scope.data.counters
    return Moved(
        result,
        after.spilled_values - before.spilled_values,
        after.spilled_bytes - before.spilled_bytes,
    )


def _check_chunk(request: PutRequest, received: int, chunk: Value) -> int:
    """Bytes received after ``chunk``; InvalidArgument past the declared size."""
    end = received + nbytes(chunk)
    if end > request.size:
        raise InvalidArgument(
            f"Put of {request.key!r}: chunks exceed the declared size of {request.size} "
            "bytes. Nothing was stored"
        )
    return end


def _write_all(writer: SpillWriter, chunks: Sequence[Value]) -> None:
    for chunk in chunks:
        writer.write(chunk)


def _read_some(reader: SpillReader, count: int) -> list[bytes]:
    """Up to ``count`` pieces; fewer only at the end, once the file is checked."""
    pieces: list[bytes] = []
    while len(pieces) < count and (piece := reader.read()):
        pieces.append(piece)
    return pieces


def _check_whole(request: PutRequest, received: int, crc: int) -> None:
    """InvalidArgument for a short stream, DataLoss for a value damaged on the way."""
    if received != request.size:
        raise InvalidArgument(
            f"Put of {request.key!r}: the stream ended after {received} of "
            f"{request.size} declared bytes. Nothing was stored"
        )
    if request.crc is not None and crc != request.crc:
        raise DataLoss(
            f"Put of {request.key!r}: the value's CRC32C is {crc:#010x}, the client's "
            f"{request.crc:#010x}: it was damaged on the way. Nothing was stored; put it again"
        )


async def _receive(request: PutRequest, chunks: AsyncIterator[Value]) -> tuple[bytes, int]:
    """Collect a value bound for RAM as its chunks arrive, each written into one buffer
    of the declared size (room for which ``Scope.route`` reserved; its pages are taken
    only as bytes arrive) and checksummed while it is fresh in the cache."""
    data, view = memctl.chunks.unfilled_bytes(request.size)
    received, crc = 0, 0
    try:
        async for chunk in chunks:
            end = _check_chunk(request, received, chunk)
            view[received:end] = chunk
            crc = checksum(chunk, crc)
            received = end
    finally:
        view.release()
    _check_whole(request, received, crc)
    return data, crc


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run ``callback`` on ``loop`` from another thread, unless the loop is gone."""
    if not loop.is_closed():
        loop.call_soon_threadsafe(callback)


def _check_key(key: str) -> None:
    problem = key_problem(key)
    if problem:
        raise InvalidArgument(problem)
