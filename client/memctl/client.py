"""The blocking client. ``AsyncClient`` (``aio.py``) is its asyncio twin."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TypeVar

import grpc

from . import _base
from ._base import USE_GRPC, Buffer, ClientBase, UseGrpc, rpc_errors
from .auth import RESUME_SECRET_VARIABLE, WORKER_ID_VARIABLE
from .errors import InvalidArgument
from .pipeline import Pipeline
from .protocol import SESSION_METADATA_KEY
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
from .worker import WorkerSession

R = TypeVar("R")


class Client(ClientBase):
    """Talk to a memctl daemon. Every call has a deadline (``timeout`` seconds).

    ``address`` is ``host:port`` or ``unix:/path``; by default ``MEMCTL_ADDRESS``,
    else ``127.0.0.1:7075``. A missing key raises ``KeyError``; bad input
    ``ValueError``; an unreachable service ``ServiceUnavailable``; a missing or
    wrong token ``Unauthenticated``.

    The token is ``token``, else the file ``token_file``, else ``MEMCTL_TOKEN``,
    else the file ``MEMCTL_TOKEN_FILE``, else the daemon's own token file, which a
    client run by the daemon's user finds by itself. ``tls_ca`` (the CA that signed
    the daemon's certificate) turns on TLS, ``tls_cert`` and ``tls_key`` present a
    client certificate (mutual TLS); each defaults to ``MEMCTL_TLS_CA``,
    ``MEMCTL_TLS_CERT``, ``MEMCTL_TLS_KEY``. ``scope`` makes every data call act on
    that scope (a worker id, or "service") instead of the client's own: it needs the
    daemon's own token.

    ``transport``: "auto" (the default, else ``MEMCTL_TRANSPORT``) sends Put, Get,
    Delete, Stat and the batches over the daemon's same-host channel when this
    process can reach it (large values as shared memory; ``memctl.samehost``), and
    over gRPC otherwise; "grpc" always uses gRPC; "same-host" always uses the
    channel, raising ``FailedPrecondition`` or ``ServiceUnavailable`` when it cannot.
    """

    def _open_channel(self) -> None:
        if self.credentials is None:
            self._channel = grpc.insecure_channel(self.address, options=_base.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(
                self.address, self.credentials, options=_base.CHANNEL_OPTIONS
            )
        self._stub = pb_grpc.MemctlServiceStub(self._channel)
        self._pipeline = Pipeline(
            _base.pipeline_call(self._channel), self.address, lambda: self.metadata
        )

    def _connection(self) -> SameHostConnection | None:
        """The same-host connection data calls use; None: gRPC."""
        link = self._same_host
        if link.mode == "grpc" or link.unavailable is not None:
            return None
        connection = link.current()
        if connection is not None:
            return connection
        with link.lock:
            connection = link.current()
            if connection is None and link.unavailable is None:
                link.drop()
                info = _base.same_host_of(self._status())
                connection = link.open(info, self.metadata, self.timeout)
            return connection

    def _over_channel(self, operation: Callable[[SameHostConnection], R]) -> R | UseGrpc:
        """``operation`` over the same-host channel, or USE_GRPC when this client uses
        gRPC. A broken connection (the daemon restarted) is found again once."""
        retried = False
        while True:
            connection = self._connection()
            if connection is None:
                return USE_GRPC
            try:
                return operation(connection)
            except ChannelBroken:
                self._same_host.drop(connection)
                if retried:
                    raise
                retried = True

    def put(self, key: str, data: Buffer, metadata: bytes = b"") -> PutResult:
        """Store ``data`` under ``key``; atomic: readers see the old value or the new.

        On the daemon's host, over the same-host channel: a value of 1 MiB or more
        (``same-host.segment-threshold``) is written into a sealed memfd that the
        daemon adopts as it is; smaller ones travel in one frame. Over gRPC, a value
        up to 1 MiB travels whole in one message, shared with whatever other
        threads of this process are sending (see ``memctl.pipeline``); larger ones
        are streamed in chunks.
        """
        _base.check_value_input(key, metadata)
        done = self._over_channel(lambda c: c.put(key, data, metadata, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        if not _base.is_inline(data):
            return self._put_streamed(key, data, metadata)
        entry = _base.put_entry(key, data, metadata)
        result = self._pipeline.call(_base.put_operation([entry]), self.timeout, key)
        return _base.put_result(result.put_many.results[0])

    def _put_streamed(self, key: str, data: Buffer, metadata: bytes) -> PutResult:
        requests = _base.put_requests(key, data, metadata)
        with rpc_errors(self.address, key):
            response = _base.put_call(self._channel)(
                requests, timeout=self.timeout, metadata=self.metadata
            )
        return _base.put_result(response)

    def put_many(
        self, items: Mapping[str, Buffer] | Iterable[tuple[str, Buffer]], metadata: bytes = b""
    ) -> list[PutResult]:
        """Store several values (a mapping or key-value pairs), in as few messages as
        fit them; results in the order given. Each message is all or nothing; a
        failure raises, and values of messages already answered stay stored."""
        pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        for key, _ in pairs:
            _base.check_value_input(key, metadata)
        done = self._over_channel(lambda c: c.put_many(pairs, metadata, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        plan = _base.PutPlan(pairs, metadata)
        sent = [(self._pipeline.send(op), key) for op, key in plan.operations()]
        answers = [self._pipeline.wait(one, self.timeout, key) for one, key in sent]
        for index, key, value in plan.answered(answers):
            plan.streamed(index, self._put_streamed(key, value, metadata))
        return plan.results()

    def get_value(self, key: str) -> StoredValue:
        """The value under ``key`` with its metadata and where it was."""
        _base.check_key(key)
        done = self._over_channel(lambda c: c.get(key, view=False, timeout=self.timeout))
        if not isinstance(done, UseGrpc):
            data, metadata, location = done
            assert isinstance(data, bytes)
            return StoredValue(data, metadata, location)
        result = self._pipeline.call(_base.get_operation([key]), self.timeout, key)
        item = result.get_many.items[0]
        if item.streamed:
            return self._get_streamed(key)
        value = _base.stored_value(item, self.address)
        if value is None:
            raise KeyError(key)
        return value

    def _get_streamed(self, key: str) -> StoredValue:
        assembler = _base.GetAssembler(key)
        with rpc_errors(self.address, key):
            for message in _base.get_call(self._channel)(
                pb.GetRequest(key=key), timeout=self.timeout, metadata=self.metadata
            ):
                assembler.feed(message)
        return assembler.result()

    def get(self, key: str) -> bytes:
        """The value under ``key``; ``KeyError`` if there is none."""
        return self.get_value(key).data

    def get_view(self, key: str) -> memoryview:
        """The value under ``key`` as a read-only memoryview. Over the same-host channel
        a value of 1 MiB or more is the daemon's shared-memory segment itself, mapped:
        no byte is copied, and the view stays valid for as long as it is held, even
        if the key is deleted, replaced or spilled meanwhile. Otherwise a view of the
        bytes ``get`` returns."""
        _base.check_key(key)
        done = self._over_channel(lambda c: c.get(key, view=True, timeout=self.timeout))
        if not isinstance(done, UseGrpc):
            data = done[0]
            return data if isinstance(data, memoryview) else memoryview(data)
        return memoryview(self.get_value(key).data)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values under ``keys`` that exist (missing keys are left out), fetched
        in as few messages as carry them."""
        names = _base.keys_list(keys)
        if not names:
            return {}
        done = self._over_channel(
            lambda c: c.get_many(list(_base.key_batches(names)), self.timeout)
        )
        if not isinstance(done, UseGrpc):
            return done
        sent = [
            self._pipeline.send(_base.get_operation(batch)) for batch in _base.key_batches(names)
        ]
        values: dict[str, bytes] = {}
        for one in sent:
            items = self._pipeline.wait(one, self.timeout).get_many.items
            for key in _base.take_values(items, values, self.address):
                values[key] = self._get_streamed(key).data
        return values

    def stat(self, key: str) -> KeyInfo:
        """Size and location of a value, without reading it."""
        _base.check_key(key)
        done = self._over_channel(lambda c: c.stat(key, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        operation = pb.Operation(stat=pb.StatRequest(key=key))
        result = self._pipeline.call(operation, self.timeout, key)
        return KeyInfo.from_pb(result.stat.info)

    def list_keys(self, prefix: str = "") -> Iterator[KeyInfo]:
        """Every key (starting with ``prefix``), sorted, fetched a page at a time."""
        token = ""
        while True:
            with rpc_errors(self.address):
                page = self._stub.ListKeys(
                    pb.ListKeysRequest(prefix=prefix, page_token=token),
                    timeout=self.timeout,
                    metadata=self.metadata,
                )
            yield from (KeyInfo.from_pb(info) for info in page.keys)
            if not page.next_page_token:
                return
            token = page.next_page_token

    def evict(
        self, keys: str | Iterable[str] | None = None, nbytes: int | None = None
    ) -> EvictResult:
        """Move ``keys``, or ``nbytes`` of least recently used values, or (neither
        given) everything in RAM, to disk. A failed spill is reported, not raised."""
        request = _base.evict_request(keys, nbytes)
        with rpc_errors(self.address):
            response = self._stub.Evict(request, timeout=self.timeout, metadata=self.metadata)
        return _base.evict_result(response)

    def delete(self, keys: str | Iterable[str]) -> int:
        """Remove values; how many of them existed."""
        batches = list(_base.key_batches(_base.keys_list(keys)))
        done = self._over_channel(lambda c: c.delete(batches, self.timeout))
        if not isinstance(done, UseGrpc):
            return done
        sent = [
            self._pipeline.send(pb.Operation(delete=pb.DeleteRequest(keys=batch)))
            for batch in batches
        ]
        return sum(int(self._pipeline.wait(one, self.timeout).delete.deleted) for one in sent)

    def delete_many(self, keys: Iterable[str]) -> int:
        """``delete`` under the name of the other batch calls."""
        return self.delete(keys)

    def status(self) -> Status:
        return Status.from_pb(self._status())

    def _status(self) -> pb.StatusResponse:
        with rpc_errors(self.address):
            response: pb.StatusResponse = self._stub.Status(
                pb.StatusRequest(), timeout=self.timeout, metadata=self.metadata
            )
        return response

    def trim(self, workers: bool = False) -> TrimResult:
        """Ask the service (and, with ``workers``, attached workers) to malloc_trim."""
        with rpc_errors(self.address):
            response = self._stub.Trim(
                pb.TrimRequest(workers=workers), timeout=self.timeout, metadata=self.metadata
            )
        return _base.trim_result(response)

    def attach(
        self,
        worker_id: str,
        *,
        nthreads: int = 1,
        memory_limit: str | int | float | None = "auto",
        pid: int | None = None,
        report_rss: bool = False,
        resume_secret: str | None = None,
        timeout: float = 10.0,
    ) -> WorkerSession:
        """Attach this process as worker ``worker_id``; returns once the session is up.

        ``memory_limit`` is "auto" (host memory * nthreads / CPUs), a byte size
        ("4 GiB", 4e9), a fraction of the host's memory (0.5), or None for no limit.
        ``pid`` defaults to this process; ``report_rss`` makes heartbeats carry this
        process's RSS, for a worker the daemon cannot see (another PID namespace): the
        daemon then never reads memory by ``pid``, and the session sends the RSS at
        once when it crosses a line the daemon acts on.
        ``resume_secret`` proves this is the worker that attached as ``worker_id``
        before (``WorkerSession.resume_secret``), to get its kept data back; a worker
        the memctl nanny started has its own in ``MEMCTL_RESUME_SECRET``, used by
        default when ``worker_id`` is ``MEMCTL_WORKER_ID``. From now until
        ``close()``, this client's data calls go to the worker's scope. A refused
        hello raises ``InvalidArgument`` (bad limit, empty id) or
        ``FailedPrecondition`` (the id is attached elsewhere, or was attached
        before and the resume secret is missing or wrong); no Session within
        ``timeout`` seconds raises ``ServiceUnavailable``. One session per client:
        a client already attached (or made with ``session=``) raises
        ``InvalidArgument``. See ``memctl.worker``.
        """
        if any(name == SESSION_METADATA_KEY for name, _ in self.metadata):
            raise InvalidArgument(
                "this client already belongs to a worker session; use one Client per worker"
            )
        if resume_secret is None and worker_id == os.environ.get(WORKER_ID_VARIABLE):
            resume_secret = os.environ.get(RESUME_SECRET_VARIABLE)
        hello = pb.Hello(
            worker_id=worker_id,
            pid=os.getpid() if pid is None else pid,
            nthreads=nthreads,
            memory_limit="none" if memory_limit is None else str(memory_limit),
            resume_secret=resume_secret or "",
            report_rss=report_rss,
        )
        return WorkerSession(self, self._stub, hello, report_rss=report_rss, timeout=timeout)

    def events(self, *, limit: int = 0, scope: str = "", after_id: int = 0) -> list[EventRecord]:
        """The service's recent events, oldest first (``limit`` 0: all it keeps)."""
        request = pb.EventsRequest(limit=limit, scope=scope, after_id=after_id)
        with rpc_errors(self.address):
            response = self._stub.Events(request, timeout=self.timeout, metadata=self.metadata)
        return [EventRecord.from_pb(event) for event in response.events]

    def close(self) -> None:
        self._same_host.drop()
        self._pipeline.close()
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
