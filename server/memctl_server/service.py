"""The gRPC servicer for ``memctl.v1.MemctlService``: thin by design.

Each method decodes the request, calls ``MemoryService``, and encodes the answer.
Domain errors become status codes in one place (``_status_errors``); anything
unexpected is logged here with its traceback and reaches the caller as INTERNAL
with a one-line message, never a traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import grpc

from memctl.protocol import CHUNK_SIZE, SESSION_METADATA_KEY
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc

from .core import MemoryService, ScopeSnapshot
from .errors import InvalidArgument, MemctlError
from .engine import Thresholds
from .scopes import KeyInfo, Scope, ScopeKind, ScopeState

logger = logging.getLogger(__name__)

_LOCATION = {"memory": pb.LOCATION_MEMORY, "disk": pb.LOCATION_DISK}
_KIND = {ScopeKind.SERVICE: pb.SCOPE_KIND_SERVICE, ScopeKind.WORKER: pb.SCOPE_KIND_WORKER}
_STATE = {
    ScopeState.RUNNING: pb.SCOPE_STATE_RUNNING,
    ScopeState.PAUSED: pb.SCOPE_STATE_PAUSED,
    ScopeState.TERMINATING: pb.SCOPE_STATE_TERMINATING,
    ScopeState.DETACHED: pb.SCOPE_STATE_DETACHED,
}


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


def _session(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == SESSION_METADATA_KEY:
            return str(value)
    return None


def thresholds_pb(thresholds: Thresholds) -> pb.Thresholds:
    return pb.Thresholds(
        **{
            name: value
            for name in ("target", "spill", "pause", "terminate")
            if (value := getattr(thresholds, name)) is not False
        }
    )


def scope_status_pb(snap: ScopeSnapshot) -> pb.ScopeStatus:
    scope, r = snap.scope, snap.readings
    return pb.ScopeStatus(
        name=scope.name,
        kind=_KIND[scope.kind],
        state=_STATE[scope.state],
        spilling=scope.spilling,
        readings=pb.MemoryReadings(
            process=r.process,
            managed=r.managed,
            unmanaged=r.unmanaged,
            unmanaged_recent=r.unmanaged_recent,
            spilled=r.spilled,
        ),
        memory_limit=scope.memory_limit or 0,
        thresholds=thresholds_pb(scope.thresholds),
        keys_in_memory=snap.keys_in_memory,
        keys_on_disk=snap.keys_on_disk,
    )


def key_info_pb(info: KeyInfo) -> pb.KeyInfo:
    return pb.KeyInfo(
        key=info.key,
        size=info.size,
        location=_LOCATION[info.location],
        metadata_size=info.metadata_size,
    )


def _chunks(value: bytes | bytearray | memoryview) -> Iterator[bytes]:
    view = memoryview(value)
    for start in range(0, view.nbytes, CHUNK_SIZE):
        yield bytes(view[start : start + CHUNK_SIZE])


class MemctlServicer(pb_grpc.MemctlServiceServicer):
    def __init__(self, core: MemoryService):
        self.core = core

    def _scope(self, context: grpc.aio.ServicerContext[Any, Any]) -> Scope:
        return self.core.scope_for(_session(context))

    async def Put(
        self,
        request_iterator: AsyncIterator[pb.PutRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> pb.PutResponse:
        async with _status_errors(context):
            messages = aiter(request_iterator)
            first = await anext(messages, None)
            if first is None or first.WhichOneof("kind") != "header":
                raise InvalidArgument("a Put stream must start with a PutHeader message")
            header = first.header
            scope = self._scope(context)
            await self.core.check_put(scope, header.key, header.size, header.metadata)
            # Assemble privately: the value becomes visible only when complete.
            value = bytearray(header.size)
            view = memoryview(value)
            received = 0
            async for message in messages:
                if message.WhichOneof("kind") != "chunk":
                    raise InvalidArgument(
                        f"Put of {header.key!r}: a second header arrived; a Put stream is "
                        "one header then chunks. Nothing was stored"
                    )
                end = received + len(message.chunk)
                if end > header.size:
                    raise InvalidArgument(
                        f"Put of {header.key!r}: chunks exceed the declared size of "
                        f"{header.size} bytes. Nothing was stored"
                    )
                view[received:end] = message.chunk
                received = end
            view.release()
            if received != header.size:
                raise InvalidArgument(
                    f"Put of {header.key!r}: the stream ended after {received} of "
                    f"{header.size} declared bytes. Nothing was stored"
                )
            location = await self.core.put(scope, header.key, value, header.metadata)
            return pb.PutResponse(key=header.key, size=header.size, location=_LOCATION[location])
        raise AssertionError("unreachable: abort raises")

    async def Get(
        self, request: pb.GetRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[pb.GetResponse]:
        async with _status_errors(context):
            value, metadata, location = await self.core.get(self._scope(context), request.key)
        size = memoryview(value).nbytes
        yield pb.GetResponse(
            header=pb.GetHeader(
                key=request.key, size=size, metadata=metadata, location=_LOCATION[location]
            )
        )
        for chunk in _chunks(value):
            yield pb.GetResponse(chunk=chunk)

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
                ),
                scopes=[scope_status_pb(snap) for snap in core.snapshot()],
            )
        raise AssertionError("unreachable: abort raises")

    async def Trim(
        self, request: pb.TrimRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.TrimResponse:
        async with _status_errors(context):
            result = await self.core.trim()
            return pb.TrimResponse(
                supported=result.supported,
                detail=result.detail,
                rss_before=result.rss_before,
                rss_after=result.rss_after,
            )
        raise AssertionError("unreachable: abort raises")

    async def Attach(
        self,
        request_iterator: AsyncIterator[pb.AttachRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.AttachResponse]:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            "the worker control stream is not available in this version of memctl",
        )
        yield pb.AttachResponse()  # pragma: no cover - makes this a generator
