"""``AsyncClient``: the asyncio twin of ``Client``, with the same methods awaited."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from types import TracebackType

import grpc

from . import _base
from ._base import Buffer, ClientBase, rpc_errors
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

    async def put(self, key: str, data: Buffer, metadata: bytes = b"") -> PutResult:
        requests = _base.put_requests(key, data, metadata)
        with rpc_errors(self.address, key):
            response = await _base.put_call(self._channel)(
                requests, timeout=self.timeout, metadata=self.metadata
            )
        return _base.put_result(response)

    async def get_value(self, key: str) -> StoredValue:
        _base.check_key(key)
        assembler = _base.GetAssembler(key)
        with rpc_errors(self.address, key):
            async for message in _base.get_call(self._channel)(
                pb.GetRequest(key=key), timeout=self.timeout, metadata=self.metadata
            ):
                assembler.feed(message)
        return assembler.result()

    async def get(self, key: str) -> bytes:
        return (await self.get_value(key)).data

    async def stat(self, key: str) -> KeyInfo:
        _base.check_key(key)
        with rpc_errors(self.address, key):
            response = await self._stub.Stat(
                pb.StatRequest(key=key), timeout=self.timeout, metadata=self.metadata
            )
        return KeyInfo.from_pb(response.info)

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
        request = pb.DeleteRequest(keys=_base.keys_list(keys))
        with rpc_errors(self.address):
            response = await self._stub.Delete(
                request, timeout=self.timeout, metadata=self.metadata
            )
        return int(response.deleted)

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
