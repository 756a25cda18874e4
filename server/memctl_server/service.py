"""The gRPC servicer for ``memctl.v1.MemctlService``: thin by design.

Each method decodes the request, calls ``MemoryService``, and encodes the answer.
Domain errors become status codes in one place (``_status_errors``); anything
unexpected is logged here with its traceback and reaches the caller as INTERNAL
with a one-line message, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from memctl import chunks
from memctl.auth import SCOPE_METADATA_KEY
from memctl.protocol import CHUNK_SIZE, MESSAGE_BUDGET, SESSION_METADATA_KEY
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc

from .auth import Authenticator, Principal
from .control import Command, ControlPlane, Session, Watch, check_rss
from .core import InlineValue, MemoryService, PutRequest, ScopeSnapshot
from .edge import client_of, metadata_value
from .engine import Thresholds
from .errors import DeadlineExceeded, InvalidArgument, MemctlError, PermissionDenied
from .events import Event
from .readings import MemoryReadings
from .scopes import KeyInfo, ManyRead, Scope
from .spillfile import Value

logger = logging.getLogger(__name__)

#: Seconds of a Put's deadline kept back from waiting for room, to answer in time.
DEADLINE_MARGIN = 0.5
#: Pipeline messages of one stream being worked on at once; past it the stream is
#: not read until one finishes (backpressure, as for calls: limits.max-calls).
PIPELINE_MESSAGES_IN_FLIGHT = 64


def enum_value(enum: Any, prefix: str, name: str) -> Any:
    """``(ScopeState, "SCOPE_STATE_", "paused")`` -> ``SCOPE_STATE_PAUSED``: the domain's
    names are the contract's, lower-cased."""
    return enum.Value(prefix + name.upper())


@asynccontextmanager
async def _status_errors(context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[None]:
    """Turn domain errors into status codes and unexpected ones into INTERNAL."""
    try:
        yield
    except MemctlError as exc:
        await context.abort(grpc.StatusCode[exc.code], str(exc))
    except (grpc.aio.AbortError, GeneratorExit):
        raise
    except Exception as exc:
        logger.exception("Unexpected error in %s", type(exc).__name__)
        await context.abort(
            grpc.StatusCode.INTERNAL,
            f"memctl hit an unexpected {type(exc).__name__}; the service log has details",
        )


#: The contract's Location for the domain's, without a name lookup per value.
LOCATION_PB = {"memory": pb.LOCATION_MEMORY, "disk": pb.LOCATION_DISK}


def thresholds_pb(thresholds: Thresholds) -> pb.Thresholds:
    return pb.Thresholds(
        **{
            name: value
            for name in ("target", "spill", "pause", "terminate")
            if (value := getattr(thresholds, name)) is not False
        }
    )


def scope_status_pb(snap: ScopeSnapshot) -> pb.ScopeStatus:
    scope = snap.scope
    return pb.ScopeStatus(
        name=scope.name,
        kind=enum_value(pb.ScopeKind, "SCOPE_KIND_", scope.kind.value),
        state=enum_value(pb.ScopeState, "SCOPE_STATE_", scope.state.value),
        spilling=scope.spilling,
        readings=readings_pb(snap.readings),
        memory_limit=scope.memory_limit or 0,
        thresholds=thresholds_pb(scope.thresholds),
        keys_in_memory=snap.sizes.keys_in_memory,
        keys_on_disk=snap.sizes.keys_on_disk,
        pid=scope.pid,
    )


def key_info_pb(info: KeyInfo) -> pb.KeyInfo:
    return pb.KeyInfo(
        key=info.key,
        size=info.size,
        location=enum_value(pb.Location, "LOCATION_", info.location),
        metadata_size=info.metadata_size,
    )


def readings_pb(r: MemoryReadings) -> pb.MemoryReadings:
    return pb.MemoryReadings(
        process=r.process,
        managed=r.managed,
        unmanaged=r.unmanaged,
        unmanaged_recent=r.unmanaged_recent,
        spilled=r.spilled,
    )


def command_pb(command: Command) -> pb.Command:
    return pb.Command(
        command_id=command.id,
        type=enum_value(pb.CommandType, "COMMAND_TYPE_", command.type),
        reason=command.reason,
        readings=readings_pb(command.readings) if command.readings else None,
        memory_limit=command.memory_limit or 0,
    )


def response_pb(item: Command | Watch) -> pb.AttachResponse:
    if isinstance(item, Watch):
        return pb.AttachResponse(rss_watch=pb.RssWatch(above=item.above, below=item.below))
    return pb.AttachResponse(command=command_pb(item))


def event_pb(event: Event) -> pb.Event:
    return pb.Event(
        id=event.id,
        time=event.time,
        kind=enum_value(pb.EventKind, "EVENT_KIND_", event.kind),
        scope=event.scope,
        reason=event.reason,
        readings=readings_pb(event.readings) if event.readings else None,
        details=event.details,
    )


def add_get_item(items: Any, read: ManyRead) -> int:
    """Append ``read`` to a GetManyResponse's ``items`` (built in place: no copies of
    the values but the one into the message); the value and metadata bytes it carries."""
    if read.location is None:
        if read.failure is not None:
            items.add(key=read.key, failure=failure_pb(read.failure))
        else:
            items.add(key=read.key)
        return 0
    if read.data is None:
        items.add(
            key=read.key,
            found=True,
            size=read.size,
            location=LOCATION_PB[read.location],
            streamed=True,
        )
        return 0
    items.add(
        key=read.key,
        found=True,
        size=read.size,
        location=LOCATION_PB[read.location],
        metadata=read.metadata,
        crc32c=read.crc,
        data=read.data if isinstance(read.data, bytes) else bytes(read.data),
    )
    return read.size + len(read.metadata)


def failure_pb(error: MemctlError) -> pb.Failure:
    return pb.Failure(code=grpc.StatusCode[error.code].value[0], message=str(error))


def inline_values(request: pb.PutManyRequest) -> list[InlineValue]:
    return [
        InlineValue(
            item.key, item.data, item.metadata, item.crc32c if item.HasField("crc32c") else None
        )
        for item in request.items
    ]


async def _chunks_of(
    key: str, messages: AsyncIterator[pb.PutRequest | memoryview]
) -> AsyncIterator[memoryview]:
    """The data chunks of a Put stream after its header (views of the bytes received)."""
    async for message in messages:
        if isinstance(message, memoryview):
            yield message
        elif message.WhichOneof("kind") == "chunk":
            yield memoryview(message.chunk)
        else:
            raise InvalidArgument(
                f"Put of {key!r}: a second header arrived; a Put stream is one header then "
                "chunks. Nothing was stored"
            )


def _chunks(*pieces: Value) -> Iterator[bytes]:
    """A value (in one piece, or several in order) as chunk messages, encoded as sent."""
    for piece in pieces:
        view = memoryview(piece).cast("B")
        for start in range(0, view.nbytes, CHUNK_SIZE):
            yield chunks.encode_chunk(view[start : start + CHUNK_SIZE])


def data_scope(
    core: MemoryService, principal: Principal, named: str | None, session_id: str | None
) -> Scope:
    """The scope a data call acts on: one an admin names, else the caller's own (its
    worker session's, or the service's). Shared by gRPC and the same-host channel."""
    if named is not None:
        if not principal.admin:
            raise PermissionDenied(
                f"scope {named!r}: naming a scope ({SCOPE_METADATA_KEY}) needs the "
                f"daemon's own token; this token is worker {principal.worker_id!r}'s "
                "and reaches only that worker's data"
            )
        return core.scope_named(named)
    scope = core.scope_for(session_id)
    if not principal.admin and scope.name != principal.worker_id:
        raise PermissionDenied(
            f"this token is worker {principal.worker_id!r}'s and reaches only that "
            f"worker's data; attach as {principal.worker_id!r} and send its session "
            f"({SESSION_METADATA_KEY}) with data calls"
        )
    return scope


class MemctlServicer(pb_grpc.MemctlServiceServicer):
    """Roles are checked here: the interceptor (``auth.py``) has let in only callers
    with a valid token; a worker token reaches only its own worker's scope, and
    naming another scope or trimming workers needs the admin token."""

    def __init__(self, core: MemoryService, control: ControlPlane, authenticator: Authenticator):
        self.core = core
        self.control = control
        self.authenticator = authenticator
        #: Where the same-host channel is, once it is bound (Status and Session say).
        self.same_host: pb.SameHost | None = None

    def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        principal = self.authenticator.principal(context.invocation_metadata())
        if principal is None:  # the interceptor refuses these; never reached through it
            raise PermissionDenied(self.authenticator.refusal(context.invocation_metadata()))
        return principal

    def _scope(self, context: grpc.aio.ServicerContext[Any, Any]) -> Scope:
        return data_scope(
            self.core,
            self._principal(context),
            metadata_value(context, SCOPE_METADATA_KEY),
            metadata_value(context, SESSION_METADATA_KEY),
        )

    async def Put(
        self,
        request_iterator: AsyncIterator[pb.PutRequest | memoryview],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PutResponse:
        async with _status_errors(context):
            messages = aiter(request_iterator)
            first = await anext(messages, None)
            if not isinstance(first, pb.PutRequest) or first.WhichOneof("kind") != "header":
                raise InvalidArgument("a Put stream must start with a PutHeader message")
            header = first.header
            request = PutRequest(
                header.key,
                header.size,
                header.metadata,
                header.crc32c if header.HasField("crc32c") else None,
            )
            location = await self.core.put(
                self._scope(context),
                request,
                _chunks_of(header.key, messages),
                wait=self._put_wait(context),
            )
            return pb.PutResponse(
                key=header.key,
                size=header.size,
                location=enum_value(pb.Location, "LOCATION_", location),
            )
        raise AssertionError("unreachable: abort raises")

    # Yields chunks already encoded, which edge.py sends as they are.
    async def Get(  # type: ignore[override]
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GetResponse | bytes]:
        async with _status_errors(context):
            scope = self._scope(context)
            read = await self.core.get(scope, request.key)
        yield pb.GetResponse(
            header=pb.GetHeader(
                key=request.key,
                size=read.entry.size,
                metadata=read.entry.metadata,
                location=enum_value(pb.Location, "LOCATION_", read.location),
                crc32c=read.entry.crc,
            )
        )
        if read.data is not None:
            for chunk in _chunks(read.data):
                yield chunk
            return
        reader = read.reader
        assert reader is not None
        try:
            async with _status_errors(context):
                # One chunk held back: the last is sent only once the file has been
                # checked whole, so a damaged value never reaches a client complete.
                held: bytes | None = None
                while pieces := await self.core.read_pieces(scope, request.key, reader):
                    for chunk in _chunks(*pieces):
                        if held is not None:
                            yield held
                        held = chunk
                if held is not None:
                    yield held
        finally:
            self.core.close_reader(reader)

    async def Stat(
        self, request: pb.StatRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatResponse:
        async with _status_errors(context):
            info = await self.core.stat(self._scope(context), request.key)
            return pb.StatResponse(info=key_info_pb(info))
        raise AssertionError("unreachable: abort raises")

    async def ListKeys(
        self, request: pb.ListKeysRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListKeysResponse:
        async with _status_errors(context):
            page, token = await self.core.list_keys(
                self._scope(context),
                prefix=request.prefix,
                page_size=request.page_size,
                page_token=request.page_token,
            )
            return pb.ListKeysResponse(
                keys=[key_info_pb(info) for info in page], next_page_token=token
            )
        raise AssertionError("unreachable: abort raises")

    async def Evict(
        self, request: pb.EvictRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EvictResponse:
        async with _status_errors(context):
            result = await self.core.evict(
                self._scope(context),
                keys=list(request.keys),
                nbytes=request.nbytes,
                everything=request.all,
            )
            return pb.EvictResponse(
                bytes_moved=result.bytes_moved,
                values_moved=result.values_moved,
                error=result.error,
            )
        raise AssertionError("unreachable: abort raises")

    async def Delete(
        self, request: pb.DeleteRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.DeleteResponse:
        async with _status_errors(context):
            deleted = await self.core.delete(self._scope(context), list(request.keys))
            return pb.DeleteResponse(deleted=deleted)
        raise AssertionError("unreachable: abort raises")

    async def PutMany(
        self, request: pb.PutManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PutManyResponse:
        async with _status_errors(context):
            response = pb.PutManyResponse()
            scope = self._scope(context)
            await self._put_many(scope, request, self._put_wait(context), response)
            return response
        raise AssertionError("unreachable: abort raises")

    async def GetMany(
        self, request: pb.GetManyRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.GetManyResponse:
        async with _status_errors(context):
            response = pb.GetManyResponse()
            await self._get_many(self._scope(context), request, response)
            return response
        raise AssertionError("unreachable: abort raises")

    async def _put_many(
        self, scope: Scope, request: pb.PutManyRequest, wait: float, into: pb.PutManyResponse
    ) -> None:
        items = inline_values(request)
        locations = await self.core.put_many(scope, items, wait=wait)
        results = into.results
        for item, location in zip(items, locations, strict=True):
            results.add(key=item.key, size=len(item.data), location=LOCATION_PB[location])

    async def _get_many(
        self, scope: Scope, request: pb.GetManyRequest, into: pb.GetManyResponse
    ) -> int:
        """Fill ``into``; the value bytes it carries."""
        reads = await self.core.get_many(scope, list(request.keys))
        items = into.items
        return sum(add_get_item(items, read) for read in reads)

    def _put_wait(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        """How long a Put may wait for room: memory.put-wait, within the call's deadline."""
        wait = self.core.settings.put_wait
        remaining = context.time_remaining()
        if remaining is not None:
            wait = max(min(wait, remaining - DEADLINE_MARGIN), 0.0)
        return wait

    # Reads with the request iterator and writes with context.write: each message is
    # worked on in a task of its own, so that one waiting for room does not hold up
    # the stream, and answered in one message (or more, past MESSAGE_BUDGET).
    async def Pipeline(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.PipelineRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        slots = asyncio.Semaphore(PIPELINE_MESSAGES_IN_FLIGHT)
        writing = asyncio.Lock()
        working: set[asyncio.Task[None]] = set()

        async def work(message: pb.PipelineRequest) -> None:
            try:
                response = pb.PipelineResponse()
                try:
                    scope = self._scope(context)
                except MemctlError as exc:  # e.g. the session expired: every operation fails
                    for operation in message.operations:
                        response.results.add(id=operation.id, failure=failure_pb(exc))
                else:
                    carried = 0
                    for operation in message.operations:
                        answer = response.results.add(id=operation.id)
                        carried += await self._operate(operation, scope, answer)
                        if carried > MESSAGE_BUDGET and len(response.results) > 1:
                            # Send what came before, so that a message stays within
                            # what clients accept; this answer starts the next one.
                            last = pb.OperationResult()
                            last.CopyFrom(response.results[-1])
                            del response.results[-1]
                            async with writing:
                                await context.write(response)
                            response = pb.PipelineResponse(results=[last])
                            carried = last.ByteSize()
                async with writing:
                    await context.write(response)
            finally:
                slots.release()

        try:
            async with _status_errors(context):
                async for message in request_iterator:
                    self.core.pipeline.messages += 1
                    self.core.pipeline.operations += len(message.operations)
                    await slots.acquire()
                    task = asyncio.create_task(work(message))
                    working.add(task)
                    task.add_done_callback(working.discard)
                if working:
                    await asyncio.gather(*working)
        finally:
            for task in working:
                task.cancel()

    async def _operate(
        self, operation: pb.Operation, scope: Scope, answer: pb.OperationResult
    ) -> int:
        """One operation of a Pipeline, answered into ``answer``; the value bytes the
        answer carries. Its failure is its own, never the stream's."""
        try:
            kind = operation.WhichOneof("kind")
            if kind == "put_many":
                wait = self.core.settings.put_wait
                await self._put_many(scope, operation.put_many, wait, answer.put_many)
            elif kind == "get_many":
                return await self._get_many(scope, operation.get_many, answer.get_many)
            elif kind == "delete":
                deleted = await self.core.delete(scope, list(operation.delete.keys))
                answer.delete.deleted = deleted
            elif kind == "stat":
                info = await self.core.stat(scope, operation.stat.key)
                answer.stat.info.CopyFrom(key_info_pb(info))
            else:
                raise InvalidArgument(
                    f"operation {operation.id} names no call; set one of put_many, "
                    "get_many, delete, stat"
                )
        except MemctlError as exc:
            answer.failure.CopyFrom(failure_pb(exc))
        except Exception as exc:
            logger.exception("Unexpected error in %s", type(exc).__name__)
            answer.failure.CopyFrom(
                pb.Failure(
                    code=grpc.StatusCode.INTERNAL.value[0],
                    message=f"memctl hit an unexpected {type(exc).__name__}; the service "
                    "log has details",
                )
            )
        return 0

    async def Status(
        self, request: pb.StatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.StatusResponse:
        async with _status_errors(context):
            core, settings = self.core, self.core.settings
            return pb.StatusResponse(
                service=pb.ServiceInfo(
                    version=core.version,
                    pid=core.process.pid,
                    uptime_seconds=core.uptime(),
                    total_memory=settings.total_memory,
                    spill_directory=str(settings.spill_directory),
                    max_spill=settings.max_spill or 0,
                    spill_compression=settings.compression,
                    monitor_interval_seconds=settings.monitor_interval,
                    same_host=self.same_host,
                ),
                scopes=[scope_status_pb(snap) for snap in core.snapshot()],
            )
        raise AssertionError("unreachable: abort raises")

    async def Trim(
        self, request: pb.TrimRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TrimResponse:
        async with _status_errors(context):
            if request.workers and not self._principal(context).admin:
                raise PermissionDenied(
                    "asking every worker to trim needs the daemon's own token; a worker "
                    "token may trim only the daemon (TrimRequest.workers false)"
                )
            asked = self.control.trim_all() if request.workers else 0
            result = await self.core.trim()
            return pb.TrimResponse(
                supported=result.supported,
                detail=result.detail,
                rss_before=result.rss_before,
                rss_after=result.rss_after,
                workers_asked=asked,
            )
        raise AssertionError("unreachable: abort raises")

    async def Events(
        self, request: pb.EventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.EventsResponse:
        async with _status_errors(context):
            events = self.core.events.select(
                limit=request.limit, scope=request.scope, after_id=request.after_id
            )
            return pb.EventsResponse(events=[event_pb(e) for e in events])
        raise AssertionError("unreachable: abort raises")

    # Reads with the request iterator (edge.py checks every message) and writes with
    # context.write, so that commands go out as they come.
    async def Attach(  # type: ignore[override]
        self,
        request_iterator: AsyncIterator[pb.AttachRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> None:
        messages = aiter(request_iterator)
        timeout = self.control.heartbeat_timeout
        async with _status_errors(context):
            try:
                first = await asyncio.wait_for(anext(messages, None), timeout)
            except TimeoutError:
                raise DeadlineExceeded(
                    f"no Hello within {timeout:g} s of opening the Attach stream "
                    "(control.heartbeat-timeout); send a Hello first"
                ) from None
            if first is None or first.WhichOneof("kind") != "hello":
                raise InvalidArgument("an Attach stream must start with a Hello message")
            hello = first.hello
            principal = self._principal(context)
            if not principal.admin and hello.worker_id != principal.worker_id:
                raise PermissionDenied(
                    f"this token is worker {principal.worker_id!r}'s; it may attach only "
                    f"as {principal.worker_id!r}, not as {hello.worker_id!r}"
                )
            session = await self.control.attach(
                hello.worker_id,
                hello.pid,
                hello.nthreads,
                hello.memory_limit,
                resume_secret=hello.resume_secret,
                client=client_of(context),
                report_rss=hello.report_rss,
            )
        why = "the stream broke"
        try:
            scope = session.scope
            await context.write(
                pb.AttachResponse(
                    session=pb.Session(
                        session_id=session.session_id,
                        memory_limit=scope.memory_limit or 0,
                        thresholds=thresholds_pb(scope.thresholds),
                        heartbeat_interval_seconds=self.control.heartbeat_interval_of(session),
                        keys_kept=session.keys_kept,
                        resume_secret=session.resume_secret,
                        supervised=scope.supervised,
                        same_host=self.same_host,
                    )
                )
            )
            why = await self._pump(session, messages, context)
        except MemctlError as exc:  # a bad message: end the stream, say why
            why = str(exc)
            await context.abort(grpc.StatusCode[exc.code], why)
        finally:
            self.control.detach(session, why)

    async def _pump(
        self,
        session: Session,
        messages: AsyncIterator[pb.AttachRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> str:
        """Send commands as they come while reading heartbeats; why the stream ended."""
        reader = asyncio.create_task(self._read(session, messages))
        try:
            while True:
                getter = asyncio.create_task(session.outbox.get())
                done, _ = await asyncio.wait({reader, getter}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    item = getter.result()
                    if item is None:
                        return "the service is shutting down"
                    await context.write(response_pb(item))
                else:
                    getter.cancel()
                if reader in done:
                    return reader.result()
        finally:
            reader.cancel()

    async def _read(self, session: Session, messages: AsyncIterator[pb.AttachRequest]) -> str:
        """Handle heartbeats and results until the stream ends or the worker counts as
        gone (``ControlPlane.silence``); why it ended. A bad message raises MemctlError
        (Attach ends the stream with its status)."""
        heard = time.monotonic()
        # One read at a time, never cancelled while the worker is kept: a cancelled
        # read could lose the message it was receiving.
        read = asyncio.ensure_future(anext(messages, None))
        try:
            while True:
                done, _ = await asyncio.wait({read}, timeout=self.control.heartbeat_timeout)
                if not done:
                    why = self.control.silence(session, time.monotonic() - heard)
                    if why is not None:
                        return why
                    continue
                try:
                    message = read.result()
                except MemctlError:
                    raise
                except Exception as exc:  # grpc's own stream errors, e.g. server stopped
                    return f"the stream broke ({type(exc).__name__})"
                if message is None:
                    return "the worker closed the stream"
                heard = time.monotonic()
                read = asyncio.ensure_future(anext(messages, None))
                kind = message.WhichOneof("kind")
                if kind == "heartbeat":
                    hb = message.heartbeat
                    self.control.heartbeat(session, hb.rss if hb.HasField("rss") else None)
                elif kind == "result":
                    self._answered(session, message.result)
                else:
                    return "the worker sent a second hello"
        finally:
            read.cancel()

    def _answered(self, session: Session, result: pb.CommandResult) -> None:
        check_rss(result.rss_before, "CommandResult.rss_before")
        check_rss(result.rss_after, "CommandResult.rss_after")
        logger.info(
            "Worker %r answered command %d: %s%s",
            session.worker_id,
            result.command_id,
            "ok" if result.ok else "failed",
            f" ({result.detail})" if result.detail else "",
        )
        if self.control.answered(session, result.command_id) == "trim":
            self.core.events.record(
                "trim",
                session.worker_id,
                result.detail,
                rss_before=result.rss_before,
                rss_after=result.rss_after,
            )
