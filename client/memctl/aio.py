"""``AsyncClient``: the asyncio twin of ``Client``, with the same methods awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from types import TracebackType
from typing import TypeVar

import grpc

from . import _base
from ._base import USE_GRPC, Buffer, ClientBase, UseGrpc, rpc_errors
from .pipeline import AsyncPipeline
from .results import (
    EventRecord,
    EvictResult,
    KeyInfo,
    PutResult,
    Status,
    StoredValue,
    TrimResult,
)
from .samehost import ChannelBroken, SameHostConnection
from .v1 import memctl_pb2 as pb
from .v1 import memctl_pb2_grpc as pb_grpc

R = TypeVar("R")


class AsyncClient(ClientBase):
    """Talk to a memctl daemon from asyncio code; see ``Client`` for the semantics."""

    def _open_channel(self) -> None:
        if self.credentials is None:
            self._channel = grpc.aio.insecure_channel(self.address, options=_base.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(
                self.address, self.credentials, options=_base.CHANNEL_OPTIONS
            )
        self._stub = pb_grpc.MemctlServiceStub(self._channel)
        self._pipeline = AsyncPipeline(
            _base.pipeline_call(self._channel), self.address, lambda: self.metadata
        )

    async def _connection(self) -> SameHostConnection | None:
        """The same-host connection data calls use; None: gRPC."""
        link = self._same_host
        if link.mode == "grpc" or link.unavailable is not None:
            return None
        connection = link.current()
        if connection is None:
            info = _base.same_host_of(await self._status())
            connection = link.current()  # another task may have opened it meanwhile
            if connection is None and link.unavailable is None:
                link.drop()
                connection = link.open(info, self.metadata, self.timeout)
        return connection

    async def _over_channel(self, operation: Callable[[SameHostConnection], R]) -> R | UseGrpc:
        """``operation`` over the same-host channel, on a worker thread (the channel's
        client is blocking), or USE_GRPC. A broken connection is found again once."""
        retried = False
        while True:
            connection = await self._connection()
            if connection is None:
                return USE_GRPC
            try:
                return await asyncio.to_thread(operation, connection)
            except ChannelBroken:
                self._same_host.drop(connection)
                if retried:
                    raise
                retried = True

    async def put(self, key: str, data: Buffer, metadata: bytes = b"") -> PutResult:
        _base.check_value_input(key, metadata)
        done = await self._over_channel(lambda c: c.put(key, data, metadata, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        if not _base.is_inline(data):
            return await self._put_streamed(key, data, metadata)
        entry = _base.put_entry(key, data, metadata)
        result = await self._pipeline.call(_base.put_operation([entry]), self.timeout, key)
        return _base.put_result(result.put_many.results[0])

    async def _put_streamed(self, key: str, data: Buffer, metadata: bytes) -> PutResult:
        requests = _base.put_requests(key, data, metadata)
        with rpc_errors(self.address, key):
            response = await _base.put_call(self._channel)(
                requests, timeout=self.timeout, metadata=self.metadata
            )
        return _base.put_result(response)

    async def put_many(
        self, items: Mapping[str, Buffer] | Iterable[tuple[str, Buffer]], metadata: bytes = b""
    ) -> list[PutResult]:
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        for key, _ in pairs:
            _base.check_value_input(key, metadata)
        done = await self._over_channel(lambda c: c.put_many(pairs, metadata, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        plan = _base.PutPlan(pairs, metadata)
        answers = await asyncio.gather(
            *(self._pipeline.call(op, self.timeout, key) for op, key in plan.operations())
        )
        for index, key, value in plan.answered(answers):
            plan.streamed(index, await self._put_streamed(key, value, metadata))
        return plan.results()

    async def get_value(self, key: str) -> StoredValue:
        _base.check_key(key)
        done = await self._over_channel(lambda c: c.get(key, view=False, timeout=self.timeout))
        if not isinstance(done, UseGrpc):
            data, metadata, location = done
            assert isinstance(data, bytes)
            return StoredValue(data, metadata, location)
        result = await self._pipeline.call(_base.get_operation([key]), self.timeout, key)
        item = result.get_many.items[0]
        if item.streamed:
            return await self._get_streamed(key)
        value = _base.stored_value(item, self.address)
        if value is None:
            raise KeyError(key)
        return value

    async def _get_streamed(self, key: str) -> StoredValue:
        assembler = _base.GetAssembler(key)
        with rpc_errors(self.address, key):
            async for message in _base.get_call(self._channel)(
                pb.GetRequest(key=key), timeout=self.timeout, metadata=self.metadata
            ):
                assembler.feed(message)
        return assembler.result()

    async def get(self, key: str) -> bytes:
        return (await self.get_value(key)).data

    async def get_view(self, key: str) -> memoryview:
        _base.check_key(key)
        done = await self._over_channel(lambda c: c.get(key, view=True, timeout=self.timeout))
        if not isinstance(done, UseGrpc):
            data = done[0]
            return data if isinstance(data, memoryview) else memoryview(data)
        return memoryview((await self.get_value(key)).data)

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        names = _base.keys_list(keys)
        if not names:
            return {}
        done = await self._over_channel(
            lambda c: c.get_many(list(_base.key_batches(names)), self.timeout)
        )
        if not isinstance(done, UseGrpc):
            return done
        answers = await asyncio.gather(
            *(
                self._pipeline.call(_base.get_operation(batch), self.timeout)
                for batch in _base.key_batches(names)
            )
        )
        values: dict[str, bytes] = {}
        for answer in answers:
            for key in _base.take_values(answer.get_many.items, values, self.address):
                values[key] = (await self._get_streamed(key)).data
        return values

    async def stat(self, key: str) -> KeyInfo:
        _base.check_key(key)
        done = await self._over_channel(lambda c: c.stat(key, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        operation = pb.Operation(stat=pb.StatRequest(key=key))
        result = await self._pipeline.call(operation, self.timeout, key)
        return KeyInfo.from_pb(result.stat.info)

    async def list_keys(self, prefix: str = "") -> AsyncIterator[KeyInfo]:
        token = ""
        while True:
            with rpc_errors(self.address):
                page = await self._stub.ListKeys(
                    pb.ListKeysRequest(prefix=prefix, page_token=token),
                    timeout=self.timeout,
                    metadata=self.metadata,
                )
            for info in page.keys:
                yield KeyInfo.from_pb(info)
            if not page.next_page_token:
                return
            token = page.next_page_token

    async def evict(
        self, keys: str | Iterable[str] | None = None, nbytes: int | None = None
    ) -> EvictResult:
        request = _base.evict_request(keys, nbytes)
        with rpc_errors(self.address):
            response = await self._stub.Evict(request, timeout=self.timeout, metadata=self.metadata)
        return _base.evict_result(response)

    async def delete(self, keys: str | Iterable[str]) -> int:
        batches = list(_base.key_batches(_base.keys_list(keys)))
        done = await self._over_channel(lambda c: c.delete(batches, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        answers = await asyncio.gather(
            *(
                self._pipeline.call(pb.Operation(delete=pb.DeleteRequest(keys=batch)), self.timeout)
                for batch in batches
            )
        )
        return sum(int(answer.delete.deleted) for answer in answers)

    async def delete_many(self, keys: Iterable[str]) -> int:
        return await self.delete(keys)

    async def status(self) -> Status:
        return Status.from_pb(await self._status())

    async def _status(self) -> pb.StatusResponse:
        with rpc_errors(self.address):
            response: pb.StatusResponse = await self._stub.Status(
                pb.StatusRequest(), timeout=self.timeout, metadata=self.metadata
            )
        return response

    async def trim(self, workers: bool = False) -> TrimResult:
        with rpc_errors(self.address):
            response = await self._stub.Trim(
                pb.TrimRequest(workers=workers), timeout=self.timeout, metadata=self.metadata
            )
        return _base.trim_result(response)

    async def events(
        self, *, limit: int = 0, scope: str = "", after_id: int = 0
    ) -> list[EventRecord]:
        request = pb.EventsRequest(limit=limit, scope=scope, after_id=after_id)
        with rpc_errors(self.address):
            response = await self._stub.Events(
                request, timeout=self.timeout, metadata=self.metadata
            )
        return [EventRecord.from_pb(event) for event in response.events]

    async def close(self) -> None:
        self._same_host.drop()
        self._pipeline.close()
        await self._channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
