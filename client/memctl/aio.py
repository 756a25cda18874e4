"""``AsyncClient``: the asyncio twin of ``Client``, with the same methods awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable, Mapping
from types import TracebackType

import grpc

from . import _base
from ._base import Buffer, ClientBase, rpc_errors
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
from .v1 import memctl_pb2 as pb
from .v1 import memctl_pb2_grpc as pb_grpc


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

    async def put(self, key: str, data: Buffer, metadata: bytes = b"") -> PutResult:
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
        plan = _base.PutPlan(items, metadata)
        answers = await asyncio.gather(
            *(self._pipeline.call(op, self.timeout, key) for op, key in plan.operations())
        )
        for index, key, value in plan.answered(answers):
            plan.streamed(index, await self._put_streamed(key, value, metadata))
        return plan.results()

    async def get_value(self, key: str) -> StoredValue:
        _base.check_key(key)
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

    async def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        names = _base.keys_list(keys)
        if not names:
            return {}
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
        answers = await asyncio.gather(
            *(
                self._pipeline.call(pb.Operation(delete=pb.DeleteRequest(keys=batch)), self.timeout)
                for batch in _base.key_batches(_base.keys_list(keys))
            )
        )
        return sum(int(answer.delete.deleted) for answer in answers)

    async def delete_many(self, keys: Iterable[str]) -> int:
        return await self.delete(keys)

    async def status(self) -> Status:
        with rpc_errors(self.address):
            response = await self._stub.Status(
                pb.StatusRequest(), timeout=self.timeout, metadata=self.metadata
            )
        return Status.from_pb(response)

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
