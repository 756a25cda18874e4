"""The client's end of the same-host channel (``protos/SAME_HOST.md``).

A client on the daemon's host talks to its unix socket instead of gRPC for Put,
Get, Delete, Stat and the batches: a 12-byte header and a binary body per
operation (``memctl.wire``), and values of ``segment_threshold`` bytes or more in
sealed memfds, whose descriptors travel with the frame. A Get of such a value
maps the daemon's memfd read-only: ``get_view`` returns that mapping itself (no
byte copied, valid for as long as the caller holds it, even after the key is
deleted), ``get`` a copy of it.

One connection per client, shared by its threads without a reader thread: a
caller sends its frame, then either reads the socket itself (the one thread that
holds the read lock at a time, dispatching every answer it receives to the thread
waiting for it) or waits to be handed its answer. A lone caller thus sends and
receives on its own thread, with no hand-off; many callers' frames are answered
together.
"""

from __future__ import annotations

import array
import fcntl
import itertools
import mmap
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import crc32c

from . import wire
from .errors import DataLoss, MemctlError, ServiceUnavailable, from_failure
from .protocol import MAX_INLINE_VALUE, key_problem
from .results import KeyInfo, Location, PutResult

Buffer = bytes | bytearray | memoryview

READ_SIZE = 256 * 1024
_ANCILLARY_SPACE = socket.CMSG_SPACE(16 * 4)
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
#: How often a thread waiting for its answer checks that someone is reading.
_WAIT_STEP = 0.05


class ChannelBroken(ServiceUnavailable):
    """The channel's connection is gone (the daemon stopped, or the socket failed)."""


class _Pending:
    """One request waiting for its answer."""

    __slots__ = ("body", "done", "event", "fd", "status")

    def __init__(self) -> None:
        #: Made only by a caller that has to wait for another thread to read.
        self.event: threading.Event | None = None
        self.done = False
        self.status = 0
        self.body: bytes = b""
        self.fd = -1


class Answer(NamedTuple):
    body: memoryview
    fd: int


class SameHostConnection:
    """A connection to a daemon's same-host channel, authenticated by its HELLO."""

    def __init__(
        self,
        path: str,
        *,
        token: str,
        session: str = "",
        scope: str = "",
        instance_id: str = "",
        timeout: float,
        address: str,
    ):
        self.address = address
        self.path = path
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        self._timeout = timeout
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise ServiceUnavailable(
                f"cannot reach memctl's same-host channel at {path}: {exc.strerror or exc}"
            ) from None
        self._sock = sock
        self._ids = itertools.count(1)
        self._pending: dict[int, _Pending] = {}
        self._send_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self.broken: str | None = None
        answer = self.call(wire.HELLO, [wire.encode_hello(token, session, scope)], timeout=timeout)
        self.welcome = wire.decode_welcome(answer.body)
        if instance_id and self.welcome.instance_id != instance_id:
            self.close()
            raise ServiceUnavailable(
                f"the same-host channel at {path} belongs to another memctl than the one at "
                f"{address}"
            )

    # --- frames ---------------------------------------------------------------------------
    def call(
        self,
        op: int,
        parts: Sequence[Buffer],
        *,
        fd: int = -1,
        timeout: float,
        key: str | None = None,
    ) -> Answer:
        """Send one request and wait for its answer; the client's exception for an
        error answer (``KeyError`` for NOT_FOUND)."""
        return self.wait(self.send(op, parts, fd=fd, timeout=timeout), timeout, key)

    def send(
        self, op: int, parts: Sequence[Buffer], *, fd: int = -1, timeout: float
    ) -> tuple[int, _Pending]:
        if self.broken is not None:
            raise ChannelBroken(self.broken)
        length = sum(memoryview(p).nbytes for p in parts)
        request_id = next(self._ids) & 0xFFFFFFFF
        pending = _Pending()
        self._pending[request_id] = pending
        frame = [wire.header(length, request_id, op, 0, wire.FLAG_FD if fd >= 0 else 0), *parts]
        try:
            with self._send_lock:
                self._set_timeout(timeout)
                self._send_all(frame, fd)
        except OSError as exc:
            self._pending.pop(request_id, None)
            self._break(f"sending to memctl's same-host channel failed: {exc}")
            raise ChannelBroken(self.broken or "") from None
        return request_id, pending

    def _send_all(self, frame: list[Buffer], fd: int) -> None:
        views = [memoryview(p).cast("B") for p in frame]
        ancillary = (
            [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))] if fd >= 0 else []
        )
        while views:
            sent = self._sock.sendmsg(views[:512], ancillary)
            ancillary = []
            while views and sent >= views[0].nbytes:
                sent -= views[0].nbytes
                views.pop(0)
            if sent:
                views[0] = views[0][sent:]

    def wait(self, sent: tuple[int, _Pending], timeout: float, key: str | None = None) -> Answer:
        request_id, pending = sent
        deadline = time.monotonic() + timeout
        try:
            while not pending.done:
                if self._read_lock.acquire(blocking=False):
                    try:
                        while not pending.done:
                            self._receive(deadline)
                    finally:
                        self._read_lock.release()
                        self._hand_over()
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError
                event = pending.event
                if event is None:
                    event = pending.event = threading.Event()
                    if pending.done:  # answered before the reader could see the event
                        break
                event.wait(min(remaining, _WAIT_STEP))
                event.clear()
        except TimeoutError:
            self._pending.pop(request_id, None)
            raise ServiceUnavailable(
                f"memctl at {self.address} did not answer in time; raise the client's timeout"
            ) from None
        if pending.status == wire.OK:
            return Answer(memoryview(pending.body), pending.fd)
        if pending.fd >= 0:
            os.close(pending.fd)
        message = bytes(pending.body).decode("utf-8", "replace")
        if pending.status == wire.UNAVAILABLE:
            raise ChannelBroken(message)
        raise from_failure(pending.status, message, self.address, key)

    def _read(self, remaining: float) -> tuple[bytes, list[tuple[int, int, bytes]]]:
        self._set_timeout(remaining)
        data, ancillary, _, _ = self._sock.recvmsg(READ_SIZE, _ANCILLARY_SPACE)
        return data, ancillary

    def _set_timeout(self, seconds: float) -> None:
        """The socket's timeout, changed only when it must shrink by more than a
        tenth or grow (each change is a system call)."""
        current = self._timeout
        if seconds < current * 0.9 or seconds > current:
            self._sock.settimeout(seconds)
            self._timeout = seconds

    def _hand_over(self) -> None:
        """Wake one waiting thread, so that someone reads for it."""
        for other in list(self._pending.values()):
            if not other.done and other.event is not None:
                other.event.set()
                return

    def _receive(self, deadline: float) -> None:
        """Read once from the socket and dispatch every whole answer it completes."""
        if self.broken is not None:
            raise ChannelBroken(self.broken)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError
        try:
            data, ancillary = self._read(remaining)
        except TimeoutError:
            raise
        except OSError as exc:
            self._break(f"reading from memctl's same-host channel failed: {exc}")
            raise ChannelBroken(self.broken or "") from None
        self._fds.extend(wire.received_fds(ancillary))
        if not data:
            self._break("memctl closed the same-host channel (it stopped, or refused a frame)")
            raise ChannelBroken(self.broken or "")
        buffer = self._buffer
        buffer += data
        start = 0
        while len(buffer) - start >= wire.HEADER_SIZE:
            length, request_id, _op, status, frame_flags = wire.HEADER.unpack_from(buffer, start)
            end = start + wire.HEADER_SIZE + length
            if len(buffer) < end:
                break
            with memoryview(buffer) as view:
                body = view[start + wire.HEADER_SIZE : end].tobytes()
            start = end
            fd = self._fds.popleft() if frame_flags & wire.FLAG_FD and self._fds else -1
            pending = self._pending.pop(request_id, None)
            if pending is None:  # its caller gave up waiting
                if fd >= 0:
                    os.close(fd)
                if request_id == 0 and status != wire.OK:  # the daemon refused the connection
                    self._break(body.decode("utf-8", "replace"))
                continue
            pending.status, pending.body, pending.fd = status, body, fd
            pending.done = True
            if pending.event is not None:
                pending.event.set()
        del buffer[:start]

    def _break(self, why: str) -> None:
        self.broken = why
        for pending in list(self._pending.values()):
            if not pending.done:
                pending.status = wire.UNAVAILABLE
                pending.body = why.encode()
                pending.done = True
                if pending.event is not None:
                    pending.event.set()
        self._pending.clear()

    def close(self) -> None:
        if self.broken is None:
            self._break("the client closed the same-host channel")
        self._sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    # --- operations -----------------------------------------------------------------------
    @property
    def segment_threshold(self) -> int:
        return self.welcome.segment_threshold

    def put(self, key: str, data: Buffer, metadata: bytes, timeout: float) -> PutResult:
        view = memoryview(data).cast("B")
        size = view.nbytes
        framed = size + len(key.encode()) + len(metadata) + 64
        if size >= self.segment_threshold or framed > self.welcome.max_frame:
            fd = memfd_of(view)
            try:
                head = wire.encode_put_head(key, metadata, wire.SOURCE_MEMFD, size)
                sent = self.send(wire.PUT, [head], fd=fd, timeout=timeout)
            finally:
                os.close(fd)  # the daemon has its own descriptor of it now
            answer = self.wait(sent, timeout, key)
        else:
            crc = crc32c.crc32c(view)
            head = wire.encode_put_head(key, metadata, wire.SOURCE_INLINE, size, crc)
            answer = self.call(wire.PUT, [head, view], timeout=timeout, key=key)
        location, stored = wire.decode_put_answer(answer.body)
        return PutResult(key, stored, _location(location))

    def get(
        self, key: str, *, view: bool, timeout: float
    ) -> tuple[bytes | memoryview, bytes, Location]:
        """A value, its metadata and location; ``view``: a read-only memoryview (of the
        daemon's segment itself for a large value), else bytes."""
        answer = self.call(
            wire.GET, [wire.encode_get(key, wire.ACCEPT_MEMFD)], timeout=timeout, key=key
        )
        got = wire.decode_get_answer(answer.body)
        location = _location(got.location)
        if got.form == wire.SOURCE_MEMFD:
            if answer.fd < 0:
                raise MemctlError(f"Get of {key!r}: the daemon's answer lacks its memfd")
            try:
                mapping = mmap.mmap(answer.fd, got.size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
            finally:
                os.close(answer.fd)
            if view:
                return memoryview(mapping), got.metadata, location
            try:
                return mapping[:], got.metadata, location
            finally:
                mapping.close()
        if answer.fd >= 0:
            os.close(answer.fd)
        data = got.data
        crc = crc32c.crc32c(data)
        if crc != got.crc:
            raise DataLoss(
                f"Get of {key!r}: the bytes received have CRC32C {crc:#010x}, the service "
                f"sent {got.crc:#010x}; they were damaged on the way, read the value again"
            )
        if view:
            return memoryview(bytes(data)), got.metadata, location
        return bytes(data), got.metadata, location

    def stat(self, key: str, timeout: float) -> KeyInfo:
        answer = self.call(wire.STAT, [wire.encode_key(key)], timeout=timeout, key=key)
        size, location, metadata_size = wire.decode_stat_answer(answer.body)
        return KeyInfo(key, size, _location(location), metadata_size)

    def delete(self, batches: Iterable[list[str]], timeout: float) -> int:
        sent = [self.send(wire.DELETE, [wire.encode_keys(b)], timeout=timeout) for b in batches]
        return sum(wire.decode_count(self.wait(one, timeout).body) for one in sent)

    def put_many(
        self, pairs: list[tuple[str, Buffer]], metadata: bytes, timeout: float
    ) -> list[PutResult]:
        """Small values in frames of up to the daemon's frame size, pipelined; large
        ones each as a Put. Results in the order given."""
        results: dict[int, PutResult] = {}
        batches: list[list[tuple[int, str, int]]] = []
        parts: list[list[bytes]] = []
        batch: list[tuple[int, str, int]] = []
        encoded: list[bytes] = []
        size = 0
        budget = self.welcome.max_frame - 64
        large = []
        for index, (key, data) in enumerate(pairs):
            view = memoryview(data).cast("B")
            if view.nbytes >= self.segment_threshold or view.nbytes > MAX_INLINE_VALUE:
                large.append(index)
                continue
            problem = key_problem(key)
            if problem:
                raise ValueError(problem)
            value = bytes(view)
            item = wire.encode_put_item(key, value, metadata, crc32c.crc32c(value))
            if batch and size + len(item) > budget:
                batches.append(batch)
                parts.append(encoded)
                batch, encoded, size = [], [], 0
            batch.append((index, key, len(value)))
            encoded.append(item)
            size += len(item)
        if batch:
            batches.append(batch)
            parts.append(encoded)
        sent = [
            self.send(wire.PUT_MANY, [wire.encode_count(len(b)), *p], timeout=timeout)
            for b, p in zip(batches, parts, strict=True)
        ]
        for one, numbered in zip(sent, batches, strict=True):
            locations = wire.decode_locations(self.wait(one, timeout, numbered[0][1]).body)
            for (index, key, length), location in zip(numbered, locations, strict=True):
                results[index] = PutResult(key, length, _location(location))
        for index in large:
            key, data = pairs[index]
            results[index] = self.put(key, data, metadata, timeout)
        return [results[i] for i in range(len(pairs))]

    def get_many(self, batches: Iterable[list[str]], timeout: float) -> dict[str, bytes]:
        sent = [self.send(wire.GET_MANY, [wire.encode_keys(b)], timeout=timeout) for b in batches]
        values: dict[str, bytes] = {}
        for one, keys in zip(sent, batches, strict=True):
            items = wire.decode_get_many_answer(self.wait(one, timeout).body)
            for key, item in zip(keys, items, strict=True):
                if item.state == wire.ITEM_VALUE:
                    crc = crc32c.crc32c(item.data)
                    if crc != item.crc:
                        raise DataLoss(
                            f"Get of {key!r}: the bytes received have CRC32C {crc:#010x}, the "
                            f"service sent {item.crc:#010x}; read the value again"
                        )
                    values[key] = item.data
                elif item.state == wire.ITEM_TOO_LARGE:
                    try:
                        data, _, _ = self.get(key, view=False, timeout=timeout)
                    except KeyError:
                        continue  # deleted meanwhile
                    assert isinstance(data, bytes)
                    values[key] = data
                elif item.state == wire.ITEM_FAILED:
                    raise from_failure(item.code, item.message, self.address, key)
        return values


def memfd_of(view: memoryview) -> int:
    """A new memfd holding ``view``, sealed against writes, shrinking and growing."""
    fd = os.memfd_create("memctl-value", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        offset = 0
        while offset < view.nbytes:
            offset += os.write(fd, view[offset:])
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _location(name: str) -> Location:
    return "memory" if name == "memory" else "disk" if name == "disk" else "unknown"
