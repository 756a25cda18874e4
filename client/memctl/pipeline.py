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
from typing import Any, NamedTuple

import grpc

from .chunks import varint
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


#: Field 1 of PipelineRequest (``operations``), length-delimited.
OPERATION_TAG = 0x0A


class _Encoded(NamedTuple):
    """An operation encoded as a field of a PipelineRequest: its tag and length, then
    the operation. Encoded when sent, so that a message is the join of its
    operations' bytes: no copy of them into a request message, no ``ByteSize`` (which
    costs protobuf a serialization) to tell whether one more fits."""

    prefix: bytes
    body: bytes


def _encoded(operation: pb.Operation) -> _Encoded:
    body = operation.SerializeToString()
    return _Encoded(bytes((OPERATION_TAG,)) + varint(len(body)), body)


def _gather(
    first: _Encoded, take: Callable[[], _Encoded | None]
) -> tuple[bytes, _Encoded | None, bool]:
    """One message, encoded: ``first`` and the operations already waiting (``take``,
    which raises when none is), up to MAX_OPERATIONS_PER_MESSAGE and MESSAGE_BUDGET
    bytes. Also the one that did not fit (it starts the next message), and whether
    the end of the stream (None) was taken."""
    parts, size = [*first], len(first.prefix) + len(first.body)
    while len(parts) < 2 * MAX_OPERATIONS_PER_MESSAGE:  # two parts an operation
        try:
            following = take()
        except (queue.Empty, asyncio.QueueEmpty):
            break
        if following is None:
            return b"".join(parts), None, True
        size += len(following.prefix) + len(following.body)
        if size > MESSAGE_BUDGET:
            return b"".join(parts), following, False
        parts += following
    return b"".join(parts), None, False


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

    def __init__(self, pipeline_call: Any, metadata: Metadata):
        self.metadata = metadata
        self._outbox: queue.SimpleQueue[_Encoded | None] = queue.SimpleQueue()
        self._pending: dict[int, Future[pb.OperationResult]] = {}
        self._lock = threading.Lock()
        self.broken: _StreamClosed | None = None
        self._responses = pipeline_call(self._messages(), metadata=metadata)
        self._reader = threading.Thread(target=self._read, name="memctl-pipeline", daemon=True)
        self._reader.start()

    def _messages(self) -> Iterator[bytes]:
        """What gRPC's sending thread sends: the operations waiting, as many to a
        message as fit MESSAGE_BUDGET (one that would not fit goes in the next)."""
        held: _Encoded | None = None
        while True:
            operation = held if held is not None else self._outbox.get()
            if operation is None:
                return
            message, held, ended = _gather(operation, self._outbox.get_nowait)
            yield message
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

    def submit(self, operation_id: int, encoded: _Encoded) -> Future[pb.OperationResult] | None:
        """Send an operation; None if this stream is already broken."""
        future: Future[pb.OperationResult] = Future()
        with self._lock:
            if self.broken is not None:
                return None
            self._pending[operation_id] = future
        self._outbox.put(encoded)
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
        if threading.current_thread() is not self._reader:
            self._reader.join(CLOSE_WAIT)


class _PipelineBase:
    """What both clients' pipelines keep: where to open streams, and with what."""

    def __init__(self, pipeline_call: Any, address: str, metadata: Callable[[], Metadata]):
        self._pipeline_call = pipeline_call
        self._address = address
        self._metadata = metadata
        self._ids = itertools.count(1)

    def _error(self, exc: _StreamClosed, key: str | None) -> Exception:
        """The client's exception for an operation its stream could not answer."""
        return from_status(exc.code, exc.details, self._address, key)


class Pipeline(_PipelineBase):
    """The blocking client's coalescing stream (see the module's docstring)."""

    def __init__(self, pipeline_call: Any, address: str, metadata: Callable[[], Metadata]):
        super().__init__(pipeline_call, address, metadata)
        self._stream: _Stream | None = None
        self._lock = threading.Lock()

    def _current(self) -> _Stream:
        metadata = self._metadata()
        with self._lock:
            stream = self._stream
            if stream is None or stream.broken is not None or stream.metadata != metadata:
                if stream is not None:
                    stream.close()
                stream = self._stream = _Stream(self._pipeline_call, metadata)
            return stream

    def call(
        self, operation: pb.Operation, timeout: float, key: str | None = None
    ) -> pb.OperationResult:
        """Run one operation; its answer, or the client's exception for its failure."""
        return self.wait(self.send(operation), timeout, key)

    def send(self, operation: pb.Operation) -> tuple[_Stream, int, Future[pb.OperationResult]]:
        """Queue ``operation`` (to ``wait`` for later: several can be in flight)."""
        operation_id = operation.id = next(self._ids)
        encoded = _encoded(operation)
        for _ in range(2):  # a stream that broke just now: once more on a new one
            stream = self._current()
            future = stream.submit(operation_id, encoded)
            if future is not None:
                return stream, operation_id, future
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

    def __init__(self, pipeline_call: Any, metadata: Metadata):
        self.metadata = metadata
        self._outbox: asyncio.Queue[_Encoded | None] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[pb.OperationResult]] = {}
        self.broken: _StreamClosed | None = None
        self._call = pipeline_call(self._messages(), metadata=metadata)
        self._reader = asyncio.create_task(self._read())

    async def _messages(self) -> AsyncIterator[bytes]:
        held: _Encoded | None = None
        while True:
            operation = held if held is not None else await self._outbox.get()
            if operation is None:
                return
            message, held, ended = _gather(operation, self._outbox.get_nowait)
            yield message
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

    def submit(
        self, operation_id: int, encoded: _Encoded
    ) -> asyncio.Future[pb.OperationResult] | None:
        if self.broken is not None:
            return None
        future: asyncio.Future[pb.OperationResult] = asyncio.get_running_loop().create_future()
        self._pending[operation_id] = future
        self._outbox.put_nowait(encoded)
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

    def __init__(self, pipeline_call: Any, address: str, metadata: Callable[[], Metadata]):
        super().__init__(pipeline_call, address, metadata)
        self._stream: _AsyncStream | None = None

    def _current(self) -> _AsyncStream:
        metadata = self._metadata()
        stream = self._stream
        if stream is None or stream.broken is not None or stream.metadata != metadata:
            if stream is not None:
                stream.close()
            stream = self._stream = _AsyncStream(self._pipeline_call, metadata)
        return stream

    async def call(
        self, operation: pb.Operation, timeout: float, key: str | None = None
    ) -> pb.OperationResult:
        """Run one operation; its answer, or the client's exception for its failure."""
        operation_id = operation.id = next(self._ids)
        encoded = _encoded(operation)
        for _ in range(2):  # a stream that broke just now: once more on a new one
            stream = self._current()
            future = stream.submit(operation_id, encoded)
            if future is not None:
                break
        else:
            assert stream.broken is not None
            raise self._error(stream.broken, key)
        try:
            result = await asyncio.wait_for(future, timeout)
        except TimeoutError:
            stream.forget(operation_id)
            raise _deadline_error(self._address) from None
        except _StreamClosed as exc:
            raise self._error(exc, key) from None
        return _checked(result, self._address, key)

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream.cancel()
            self._stream = None
