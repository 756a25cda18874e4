"""Coalescing: the small operations of one client share one long-lived Pipeline stream.

A unary gRPC call costs a Python client about as much as a thousand small values
take to copy, and a stream message only a little less; what is cheap is putting
many operations in one message. So every ``put``/``get``/``stat``/``delete`` of a
small value becomes an ``Operation`` on the client's Pipeline stream, and whatever
operations are waiting when the stream is ready to send go out together in one
message (no timer, no added latency: a lone caller's operation goes at once, and
callers that arrive while a message is on its way ride the next). A program that
simply issues many calls from threads or tasks gets batch throughput with no API
change.

The stream carries the metadata it was opened with (token, session, scope); a
client whose metadata changes (it attached as a worker, the daemon's token file
changed) opens a new stream for its next operation and lets the old one finish.
A broken stream fails the operations in flight on it, as a failed call would, and
the next operation opens a new one.

``Pipeline`` is for the blocking client (a reader thread per stream; gRPC's own
thread sends), ``AsyncPipeline`` for asyncio (a sender and a reader task).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import grpc

from .errors import MemctlError, from_failure, from_status, status_of
from .protocol import MESSAGE_BUDGET
from .v1 import memctl_pb2 as pb

Metadata = tuple[tuple[str, str], ...]

#: Most operations in one message: enough to amortise a message, few enough that
#: one message's answers do not hold up the next for long.
MAX_OPERATIONS_PER_MESSAGE = 1024


def _checked(result: pb.OperationResult, address: str, key: str | None) -> pb.OperationResult:
    if result.HasField("failure"):
        raise from_failure(result.failure.code, result.failure.message, address, key)
    return result


def _deadline_error(address: str) -> MemctlError:
    error = from_status(grpc.StatusCode.DEADLINE_EXCEEDED, None, address)
    assert isinstance(error, MemctlError)
    return error


def _gather(
    first: pb.Operation, take: Callable[[], pb.Operation | None]
) -> tuple[list[pb.Operation], pb.Operation | None, bool]:
    """One message's operations: ``first`` and those already waiting (``take``, which
    raises when none is), up to MAX_OPERATIONS_PER_MESSAGE and MESSAGE_BUDGET bytes.
    Also the one that did not fit (it starts the next message), and whether the end
    of the stream (None) was taken."""
    operations, size = [first], first.ByteSize()
    while len(operations) < MAX_OPERATIONS_PER_MESSAGE:
        try:
            following = take()
        except (queue.Empty, asyncio.QueueEmpty):
            break
        if following is None:
            return operations, None, True
        size += following.ByteSize()
        if size > MESSAGE_BUDGET:
            return operations, following, False
        operations.append(following)
    return operations, None, False


class _StreamClosed(Exception):
    """The stream ended (by the server, a failure or ``close``) before answering an
    operation, with this status. It is copied out of gRPC's call object, which nothing
    of ours keeps once the stream has ended (see ``errors.status_of``)."""

    def __init__(
        self,
        code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE,
        details: str = "the operation stream closed",
    ):
        super().__init__(details)
        self.code = code
        self.details = details

    @classmethod
    def of(cls, exc: grpc.RpcError) -> _StreamClosed:
        code, details = status_of(exc)
        return cls(code, details or "")


#: How long ``close`` waits for a stream's reader to see the stream end.
CLOSE_WAIT = 5.0


class _Stream:
    """One Pipeline stream of the blocking client and the operations in flight on it."""

    def __init__(self, stub: Any, metadata: Metadata):
        self.metadata = metadata
        self._outbox: queue.SimpleQueue[pb.Operation | None] = queue.SimpleQueue()
        self._pending: dict[int, Future[pb.OperationResult]] = {}
        self._lock = threading.Lock()
        self.broken: _StreamClosed | None = None
        self._responses = stub.Pipeline(self._messages(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="memctl-pipeline", daemon=True)
        self._reader.start()

    def _messages(self) -> Iterator[pb.PipelineRequest]:
        """What gRPC's sending thread sends: the operations waiting, as many to a
        message as fit MESSAGE_BUDGET (one that would not fit goes in the next)."""
        held: pb.Operation | None = None
        while True:
            operation = held if held is not None else self._outbox.get()
            if operation is None:
                return
            operations, held, ended = _gather(operation, self._outbox.get_nowait)
            yield pb.PipelineRequest(operations=operations)
            if ended:
                return

    def _read(self) -> None:
        error = _StreamClosed()
        try:
            for response in self._responses:
                for result in response.results:
                    with self._lock:
                        future = self._pending.pop(result.id, None)
                    if future is not None:
                        future.set_result(result)
        except grpc.RpcError as exc:
            error = _StreamClosed.of(exc)
        with self._lock:
            self.broken = error
            pending, self._pending = self._pending, {}
            self._responses = None  # gRPC's call object is freed now, in this thread
        for future in pending.values():
            future.set_exception(error)

    def submit(self, operation: pb.Operation) -> Future[pb.OperationResult] | None:
        """Send ``operation``; None if this stream is already broken."""
        future: Future[pb.OperationResult] = Future()
        with self._lock:
            if self.broken is not None:
                return None
            self._pending[operation.id] = future
        self._outbox.put(operation)
        return future

    def forget(self, operation_id: int) -> None:
        with self._lock:
            self._pending.pop(operation_id, None)

    def close(self) -> None:
        """Send nothing more; operations in flight still get their answers."""
        self._outbox.put(None)

    def cancel(self) -> None:
        """End the stream now, and return once its reader has seen it end (so no
        gRPC thread of it is left running when the interpreter exits)."""
        with self._lock:
            responses = self._responses
        if responses is not None:
            responses.cancel()
        self._reader.join(CLOSE_WAIT)


class _PipelineBase:
    """What both clients' pipelines keep: where to open streams, and with what."""

    def __init__(self, stub: Any, address: str, metadata: Callable[[], Metadata]):
        self._stub = stub
        self._address = address
        self._metadata = metadata
        self._ids = itertools.count(1)

    def _error(self, exc: _StreamClosed, key: str | None) -> Exception:
        """The client's exception for an operation its stream could not answer."""
        return from_status(exc.code, exc.details, self._address, key)


class Pipeline(_PipelineBase):
    """The blocking client's coalescing stream (see the module's docstring)."""

    def __init__(self, stub: Any, address: str, metadata: Callable[[], Metadata]):
        super().__init__(stub, address, metadata)
        self._stream: _Stream | None = None
        self._lock = threading.Lock()

    def _current(self) -> _Stream:
        metadata = self._metadata()
        with self._lock:
            stream = self._stream
            if stream is None or stream.broken is not None or stream.metadata != metadata:
                if stream is not None:
                    stream.close()
                stream = self._stream = _Stream(self._stub, metadata)
            return stream

    def call(
        self, operation: pb.Operation, timeout: float, key: str | None = None
    ) -> pb.OperationResult:
        """Run one operation; its answer, or the client's exception for its failure."""
        return self.wait(self.send(operation), timeout, key)

    def send(self, operation: pb.Operation) -> tuple[_Stream, int, Future[pb.OperationResult]]:
        """Queue ``operation`` (to ``wait`` for later: several can be in flight)."""
        operation.id = next(self._ids)
        for _ in range(2):  # a stream that broke just now: once more on a new one
            stream = self._current()
            future = stream.submit(operation)
            if future is not None:
                return stream, operation.id, future
        assert stream.broken is not None
        raise self._error(stream.broken, None)

    def wait(
        self,
        sent: tuple[_Stream, int, Future[pb.OperationResult]],
        timeout: float,
        key: str | None = None,
    ) -> pb.OperationResult:
        stream, operation_id, future = sent
        try:
            result = future.result(timeout)
        except FutureTimeout:
            stream.forget(operation_id)
            raise _deadline_error(self._address) from None
        except _StreamClosed as exc:
            raise self._error(exc, key) from None
        return _checked(result, self._address, key)

    def close(self) -> None:
        with self._lock:
            if self._stream is not None:
                self._stream.close()
                self._stream.cancel()
                self._stream = None


class _AsyncStream:
    """One Pipeline stream of the asyncio client and the operations in flight on it."""

    def __init__(self, stub: Any, metadata: Metadata):
        self.metadata = metadata
        self._outbox: asyncio.Queue[pb.Operation | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.OperationResult]] = {}
        self.broken: _StreamClosed | None = None
        self._call = stub.Pipeline(self._messages(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[pb.PipelineRequest]:
        held: pb.Operation | None = None
        while True:
            operation = held if held is not None else await self._outbox.get()
            if operation is None:
                return
            operations, held, ended = _gather(operation, self._outbox.get_nowait)
            yield pb.PipelineRequest(operations=operations)
            if ended:
                return

    async def _read(self) -> None:
        error = _StreamClosed()
        try:
            async for response in self._call:
                for result in response.results:
                    future = self._pending.pop(result.id, None)
                    if future is not None and not future.done():
                        future.set_result(result)
        except grpc.RpcError as exc:
            error = _StreamClosed.of(exc)
        except asyncio.CancelledError:
            pass
        self.broken = error
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def submit(self, operation: pb.Operation) -> asyncio.Future[pb.OperationResult] | None:
        if self.broken is not None:
            return None
        future: asyncio.Future[pb.OperationResult] = asyncio.get_running_loop().create_future()
        self._pending[operation.id] = future
        self._outbox.put_nowait(operation)
        return future

    def forget(self, operation_id: int) -> None:
        self._pending.pop(operation_id, None)

    def close(self) -> None:
        self._outbox.put_nowait(None)

    def cancel(self) -> None:
        self._call.cancel()
        self._reader.cancel()


class AsyncPipeline(_PipelineBase):
    """The asyncio client's coalescing stream (see the module's docstring)."""

    def __init__(self, stub: Any, address: str, metadata: Callable[[], Metadata]):
        super().__init__(stub, address, metadata)
        self._stream: _AsyncStream | None = None

    def _current(self) -> _AsyncStream:
        metadata = self._metadata()
        stream = self._stream
        if stream is None or stream.broken is not None or stream.metadata != metadata:
            if stream is not None:
                stream.close()
            stream = self._stream = _AsyncStream(self._stub, metadata)
        return stream

    async def call(
        self, operation: pb.Operation, timeout: float, key: str | None = None
    ) -> pb.OperationResult:
        """Run one operation; its answer, or the client's exception for its failure."""
        operation.id = next(self._ids)
        for _ in range(2):  # a stream that broke just now: once more on a new one
            stream = self._current()
            future = stream.submit(operation)
            if future is not None:
                break
        else:
            assert stream.broken is not None
            raise self._error(stream.broken, key)
        try:
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            stream.forget(operation.id)
            raise _deadline_error(self._address) from None
        except _StreamClosed as exc:
            raise self._error(exc, key) from None
        return _checked(result, self._address, key)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream.cancel()
            self._stream = None
