"""The same-host channel: a lean unix-socket protocol beside gRPC, for clients on
this host (``protos/SAME_HOST.md`` is its specification, ``memctl.wire`` its frames).

Small operations travel as length-prefixed binary frames with request ids, so a
client may pipeline them; large values travel as sealed memfds passed with
SCM_RIGHTS (``segments.py``), or, for clients that cannot pass descriptors, as
files in the daemon's /dev/shm directory. Everything else (Status, Attach, Evict,
ListKeys...) stays on gRPC, the complete contract.

Each connection is read and written by the event loop directly (``add_reader``,
``recvmsg``/``sendmsg``: asyncio's transports cannot carry descriptors). Every
frame a read brings is answered in the same turn when the operation can be done
on the event loop (values in RAM: ``MemoryService.*_now``), and all those answers
leave in one ``sendmsg``; the rest run as tasks and answer when done, in any order.

Authentication is the gRPC API's: the first frame is HELLO with the daemon's token
or a worker token (and the worker's session, or an admin's scope); the peer's
pid and uid come from SO_PEERCRED. The socket is 0600 in a private directory.
Bad input is answered with the status code gRPC would give and a one-line message;
a frame that cannot be delimited (a lying length, a missing descriptor) closes the
connection. Nothing is stored from a bad frame, and the daemon goes on serving.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import secrets
import socket
import struct
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from memctl import wire
from memctl.auth import AUTHORIZATION_METADATA_KEY
from memctl.protocol import MAX_INLINE_VALUE

from .auth import Authenticator, Principal
from .core import InlineValue, MemoryService, PutRequest
from .errors import InvalidArgument, MemctlError, NotFound
from .scopes import ManyRead, Route, Scope
from .segments import Segment, ShmDirectory, adopt_memfd
from .service import data_scope
from .spillfile import Value

logger = logging.getLogger(__name__)

#: Bytes asked of the socket per read.
READ_SIZE = 256 * 1024
#: Descriptors one read may bring (a client pipelining memfd Puts).
MAX_FDS_PER_READ = 64
_ANCILLARY_SPACE = socket.CMSG_SPACE(MAX_FDS_PER_READ * 4)
#: Operations of one connection running as tasks at once; past it the connection is
#: not read until one finishes (as limits.max-calls-per-client bounds gRPC).
MAX_IN_FLIGHT = 64
#: Answer bytes queued for a connection that does not read them; past it the
#: connection is not read either.
MAX_QUEUED_ANSWER_BYTES = 64 << 20
#: Buffers one sendmsg takes (Linux's IOV_MAX is 1024).
MAX_IOV = 512
_PEERCRED = struct.Struct("3i")


@dataclass(frozen=True)
class ChannelSettings:
    """What the channel needs from the configuration, resolved."""

    socket_path: Path
    #: Values of at least this many bytes travel as segments (memfds).
    segment_threshold: int
    #: The largest request frame accepted (``limits.max-message-size``).
    max_frame: int
    max_connections: int
    #: Seconds a Put may wait for room (``memory.put-wait``).
    put_wait: float


class SameHostChannel:
    """The listening socket and its connections."""

    def __init__(
        self,
        settings: ChannelSettings,
        core: MemoryService,
        authenticator: Authenticator,
        shm: ShmDirectory | None,
    ):
        self.settings = settings
        self.core = core
        self.authenticator = authenticator
        self.shm = shm
        #: Says which daemon a client reached (Status and HELLO both carry it).
        self.instance_id = secrets.token_hex(8)
        self.connections: set[Connection] = set()
        self._listener: socket.socket | None = None

    @property
    def path(self) -> Path:
        return self.settings.socket_path

    def bind(self) -> None:
        """Create the socket (0600 from its first moment); OSError if it cannot be."""
        path = self.settings.socket_path
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        previous = os.umask(0o177)
        try:
            path.unlink(missing_ok=True)
            listener.bind(str(path))
        except BaseException:
            listener.close()
            raise
        finally:
            os.umask(previous)
        listener.listen(256)
        listener.setblocking(False)
        self._listener = listener

    def start(self) -> None:
        assert self._listener is not None
        asyncio.get_running_loop().add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        for _ in range(64):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and the like: keep serving the others
                logger.warning("Same-host channel: cannot accept a connection: %s", exc)
                return
            sock.setblocking(False)
            connection = Connection(self, sock)
            if len(self.connections) >= self.settings.max_connections:
                connection.refuse(
                    wire.RESOURCE_EXHAUSTED,
                    f"the same-host channel has {len(self.connections)} connections, its "
                    "most (same-host.max-connections); close some, or use gRPC",
                )
                continue
            self.connections.add(connection)
            self.core.same_host.connections = len(self.connections)
            connection.start()

    def close(self) -> None:
        """Stop listening, drop every connection, remove the socket file."""
        if self._listener is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
            self.settings.socket_path.unlink(missing_ok=True)
        for connection in list(self.connections):
            connection.close()
        shm, self.shm = self.shm, None
        if shm is not None:
            shm.close()


class Connection:
    """One client's connection: reads frames, answers them, never raises out."""

    def __init__(self, channel: SameHostChannel, sock: socket.socket):
        self.channel = channel
        self.core = channel.core
        self.sock = sock
        self.fileno = sock.fileno()
        self.loop = asyncio.get_running_loop()
        try:
            self.peer_pid, self.peer_uid, _ = _PEERCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
            )
        except OSError:
            self.peer_pid, self.peer_uid = 0, -1
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        #: Answers waiting to be sent: (buffers, descriptor or -1, what keeps it open).
        self._out: deque[tuple[list[Value], int, object]] = deque()
        self._queued = 0
        self._writing = False
        self._reading = False
        self._closed = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.principal: Principal | None = None
        self._named: str | None = None
        self._session: str | None = None
        self._handlers: dict[int, Callable[[int, memoryview, int], None]] = {
            wire.PUT: self._put,
            wire.GET: self._get,
            wire.DELETE: self._delete,
            wire.STAT: self._stat,
            wire.PUT_MANY: self._put_many,
            wire.GET_MANY: self._get_many,
        }

    # --- reading ------------------------------------------------------------------------
    def start(self) -> None:
        self._resume_reading()

    def _resume_reading(self) -> None:
        if not self._reading and not self._closed:
            self.loop.add_reader(self.fileno, self._readable)
            self._reading = True

    def _pause_reading(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.fileno)
            self._reading = False

    def _readable(self) -> None:
        try:
            data, ancillary, flags, _ = self.sock.recvmsg(READ_SIZE, _ANCILLARY_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.close()
            return
        self._fds.extend(wire.received_fds(ancillary))
        if flags & socket.MSG_CTRUNC:
            self._fail(f"more than {MAX_FDS_PER_READ} descriptors arrived at once")
            return
        if not data:
            self.close()  # the client closed its end (or vanished mid-frame)
            return
        self._buffer += data
        try:
            self._frames()
        except Exception:
            logger.exception("Same-host channel: unexpected error; closing the connection")
            self.close()
            return
        self._flush()

    def _frames(self) -> None:
        """Answer every whole frame in the buffer."""
        buffer = self._buffer
        start = 0
        max_frame = self.channel.settings.max_frame
        while len(buffer) - start >= wire.HEADER_SIZE and not self._closed:
            length, request_id, op, status, flags = wire.HEADER.unpack_from(buffer, start)
            if length > max_frame:
                self._fail(
                    f"a frame of {length} bytes is more than the {max_frame} this daemon "
                    "takes (limits.max-message-size); larger values travel as memfds or "
                    "shared-memory files",
                    code=wire.RESOURCE_EXHAUSTED,
                    request_id=request_id,
                    op=op,
                )
                return
            end = start + wire.HEADER_SIZE + length
            if len(buffer) < end:
                break
            body = memoryview(_copy(buffer, start + wire.HEADER_SIZE, end))
            start = end
            self.core.same_host.operations += 1
            fd = -1
            if flags & wire.FLAG_FD:
                if not self._fds:
                    self._fail("a frame says a descriptor travels with it, and none came")
                    return
                fd = self._fds.popleft()
            self._frame(request_id, op, status, flags, body, fd)
        del buffer[:start]
        if not buffer and self._fds:
            self._fail(f"{len(self._fds)} descriptors arrived that no frame claims")

    def _frame(
        self, request_id: int, op: int, status: int, flags: int, body: memoryview, fd: int
    ) -> None:
        name = wire.OP_NAMES.get(op, f"op {op}")
        try:
            if status != 0 or flags & ~wire.KNOWN_FLAGS:
                raise InvalidArgument(
                    f"{name}: a request has status 0 and no flags but FLAG_FD (got status "
                    f"{status}, flags {flags:#x})"
                )
            if op == wire.HELLO:
                self._hello(request_id, body)
                return
            if self.principal is None:
                self._fail(
                    "the first frame of a connection is HELLO, with the daemon's token",
                    code=wire.UNAUTHENTICATED,
                    request_id=request_id,
                    op=op,
                )
                return
            handler = self._handlers.get(op)
            if handler is None:
                self._error(
                    request_id,
                    op,
                    wire.UNIMPLEMENTED,
                    f"this daemon does not know operation {op}; it speaks same-host "
                    f"protocol version {wire.VERSION}",
                )
                return
            if fd >= 0 and op != wire.PUT:
                raise InvalidArgument(f"{name} takes no descriptor; only Put does")
            handler(request_id, body, fd)
            fd = -1  # a segment owns it now (a handler that raises has not taken it)
        except wire.FrameError as exc:
            self._error(request_id, op, wire.INVALID_ARGUMENT, f"{name}: malformed frame: {exc}")
        except MemctlError as exc:
            self._error(request_id, op, _code(exc), str(exc))
        finally:
            if fd >= 0:
                os.close(fd)

    # --- HELLO ----------------------------------------------------------------------------
    def _hello(self, request_id: int, body: memoryview) -> None:
        if self.principal is not None:
            raise InvalidArgument("HELLO comes once, as a connection's first frame")
        hello = wire.decode_hello(body)
        authenticator = self.channel.authenticator
        principal = authenticator.principal_for(hello.token)
        if principal is None:
            metadata = (
                [(AUTHORIZATION_METADATA_KEY, f"Bearer {hello.token}")] if hello.token else []
            )
            self._fail(
                authenticator.refusal(metadata),
                code=wire.UNAUTHENTICATED,
                request_id=request_id,
                op=wire.HELLO,
            )
            return
        self._named = hello.scope or None
        self._session = hello.session or None
        # Refuse a scope the token may not reach now, not at the first operation.
        data_scope(self.core, principal, self._named, self._session)
        self.principal = principal
        settings = self.channel.settings
        shm = self.channel.shm
        welcome = wire.Welcome(
            wire.VERSION,
            os.getpid(),
            self.peer_pid,
            settings.max_frame,
            settings.segment_threshold,
            self.channel.instance_id,
            str(shm.path) if shm is not None else "",
        )
        self._answer(request_id, wire.HELLO, [wire.encode_welcome(welcome)])

    def _scope(self) -> Scope:
        assert self.principal is not None
        return data_scope(self.core, self.principal, self._named, self._session)

    # --- operations -----------------------------------------------------------------------
    def _put(self, request_id: int, body: memoryview, fd: int) -> None:
        put = wire.decode_put(body)
        what = f"Put of {put.key!r}"
        if put.source == wire.SOURCE_MEMFD:
            if fd < 0:
                raise InvalidArgument(f"{what}: the value is a memfd, and none came (FLAG_FD)")
            scope = self._scope()
            self.core.check_value(put.key, put.metadata, put.size)
            segment = adopt_memfd(fd, put.size, what)
            self._later(request_id, wire.PUT, self._put_segment(scope, put, segment))
            return
        if fd >= 0:
            raise InvalidArgument(f"{what}: a descriptor came with a value that is not a memfd")
        scope = self._scope()
        if put.source == wire.SOURCE_SHM_FILE:
            if self.channel.shm is None:
                raise InvalidArgument(f"{what}: this daemon has no shared-memory directory")
            self.core.check_value(put.key, put.metadata, put.size)
            self._later(request_id, wire.PUT, self._put_file(scope, put))
            return
        if put.size > MAX_INLINE_VALUE:
            request = PutRequest(put.key, put.size, put.metadata, put.crc)
            wait = self.channel.settings.put_wait
            coroutine = self.core.put(scope, request, _once(put.data), wait=wait)
            self._later(request_id, wire.PUT, _put_answer(coroutine, put.size))
            return
        items = [InlineValue(put.key, put.data, put.metadata, put.crc)]
        stored = self.core.put_many_now(scope, items)
        if stored is not None:
            self._answer(request_id, wire.PUT, [wire.encode_put_answer(stored[0], put.size)])
            return
        wait = self.channel.settings.put_wait
        coroutine = _first(self.core.put_many(scope, items, wait=wait))
        self._later(request_id, wire.PUT, _put_answer(coroutine, put.size))

    async def _put_segment(self, scope: Scope, put: wire.Put, segment: Segment) -> list[Value]:
        wait = self.channel.settings.put_wait
        location = await self.core.put_segment(scope, put.key, put.metadata, segment, wait=wait)
        return [wire.encode_put_answer(location, put.size)]

    async def _put_file(self, scope: Scope, put: wire.Put) -> list[Value]:
        shm = self.channel.shm
        assert shm is not None
        segment = await self.loop.run_in_executor(
            None, shm.take, put.file_name, put.size, self.peer_uid, f"Put of {put.key!r}"
        )
        return await self._put_segment(scope, put, segment)

    def _get(self, request_id: int, body: memoryview, fd: int) -> None:
        key, accept = wire.decode_get(body)
        scope = self._scope()
        threshold = self.channel.settings.segment_threshold
        reads = self.core.get_many_now(scope, [key], budget=1 << 62, most=threshold - 1)
        if reads is not None:
            read = reads[0]
            if read.location is None:
                raise NotFound(f"no value under key {key!r} in scope {scope.name!r}")
            if read.data is not None:
                self._answer(request_id, wire.GET, _inline_get(read, read.data))
                return
        self._later(request_id, wire.GET, self._get_later(scope, key, accept), keeps=True)

    async def _get_later(self, scope: Scope, key: str, accept: int) -> tuple[list[Value], Any]:
        threshold = self.channel.settings.segment_threshold
        if accept & wire.ACCEPT_MEMFD:
            read, segment = await self.core.share(scope, key, threshold)
        else:
            read, segment = await self.core.get(scope, key), None
        entry = read.entry
        if segment is None and read.reader is not None:
            if accept & wire.ACCEPT_MEMFD:
                segment = await self.core.segment_of(scope, key, read.reader, entry.size)
            else:
                pieces = await self._read_whole(scope, key, read.reader)
                head = wire.encode_get_answer_head(
                    read.location, entry.metadata, entry.size, entry.crc, wire.SOURCE_INLINE
                )
                return [head, *pieces], None
        if segment is not None:
            head = wire.encode_get_answer_head(
                read.location, entry.metadata, entry.size, 0, wire.SOURCE_MEMFD
            )
            return [head], segment
        assert read.data is not None
        many = ManyRead(key, read.location, entry.size, entry.metadata, entry.crc)
        return _inline_get(many, read.data), None

    async def _read_whole(self, scope: Scope, key: str, reader: Any) -> list[Value]:
        pieces: list[Value] = []
        try:
            while more := await self.core.read_pieces(scope, key, reader):
                pieces.extend(more)
        finally:
            self.core.close_reader(reader)
        return pieces

    def _delete(self, request_id: int, body: memoryview, fd: int) -> None:
        keys = wire.decode_keys(body)
        scope = self._scope()
        deleted = self.core.delete_now(scope, keys)
        if deleted is not None:
            self._answer(request_id, wire.DELETE, [wire.encode_count(deleted)])
            return
        self._later(request_id, wire.DELETE, _count_answer(self.core.delete(scope, keys)))

    def _stat(self, request_id: int, body: memoryview, fd: int) -> None:
        key = wire.decode_key(body)
        scope = self._scope()
        info = self.core.stat_now(scope, key)
        if info is not None:
            answer = wire.encode_stat_answer(info.size, info.location, info.metadata_size)
            self._answer(request_id, wire.STAT, [answer])
            return
        self._later(request_id, wire.STAT, _stat_answer(self.core.stat(scope, key)))

    def _put_many(self, request_id: int, body: memoryview, fd: int) -> None:
        items = [InlineValue(i.key, i.data, i.metadata, i.crc) for i in wire.decode_put_many(body)]
        scope = self._scope()
        stored = self.core.put_many_now(scope, items)
        if stored is not None:
            self._answer(request_id, wire.PUT_MANY, [wire.encode_locations(stored)])
            return
        wait = self.channel.settings.put_wait
        self._later(
            request_id,
            wire.PUT_MANY,
            _locations_answer(self.core.put_many(scope, items, wait=wait)),
        )

    def _get_many(self, request_id: int, body: memoryview, fd: int) -> None:
        keys = wire.decode_keys(body)
        scope = self._scope()
        budget = self.channel.settings.max_frame
        reads = self.core.get_many_now(scope, keys, budget=budget)
        if reads is not None:
            self._answer(request_id, wire.GET_MANY, _get_many_answer(reads))
            return
        coroutine = self.core.get_many_later(scope, keys, budget=budget)
        self._later(request_id, wire.GET_MANY, _get_many_later(coroutine))

    # --- answering --------------------------------------------------------------------------
    def _later(
        self, request_id: int, op: int, work: Awaitable[Any], *, keeps: bool = False
    ) -> None:
        """Run ``work`` as a task; answer with what it returns (``keeps``: buffers and
        the segment whose descriptor travels with them), or its error."""
        task = self.loop.create_task(self._run(request_id, op, work, keeps))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        if len(self._tasks) >= MAX_IN_FLIGHT:
            self._pause_reading()

    async def _run(self, request_id: int, op: int, work: Awaitable[Any], keeps: bool) -> None:
        try:
            result = await work
        except MemctlError as exc:
            self._error(request_id, op, _code(exc), str(exc))
        except Exception as exc:
            logger.exception("Unexpected error in %s", type(exc).__name__)
            self._error(
                request_id,
                op,
                wire.INTERNAL,
                f"memctl hit an unexpected {type(exc).__name__}; the service log has details",
            )
        else:
            if keeps:
                buffers, segment = result
                fd = segment.fd if segment is not None else -1
                self._answer(request_id, op, buffers, fd=fd, keep=segment)
            else:
                self._answer(request_id, op, result)
        self._flush()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if len(self._tasks) < MAX_IN_FLIGHT and self._queued < MAX_QUEUED_ANSWER_BYTES:
            self._resume_reading()

    def _answer(
        self,
        request_id: int,
        op: int,
        buffers: list[Value],
        *,
        status: int = wire.OK,
        fd: int = -1,
        keep: object = None,
    ) -> None:
        if self._closed:
            return
        length = sum(len(b) if not isinstance(b, memoryview) else b.nbytes for b in buffers)
        flags = wire.FLAG_FD if fd >= 0 else 0
        self._out.append(([wire.header(length, request_id, op, status, flags), *buffers], fd, keep))
        self._queued += length
        if self._queued >= MAX_QUEUED_ANSWER_BYTES:
            self._pause_reading()

    def _error(self, request_id: int, op: int, code: int, message: str) -> None:
        self._answer(request_id, op, [message.encode("utf-8", "replace")[:4000]], status=code)

    def _fail(
        self,
        message: str,
        *,
        code: int = wire.INVALID_ARGUMENT,
        request_id: int = 0,
        op: int = 0,
    ) -> None:
        """Answer a frame the connection cannot go on after, then close it."""
        logger.info(
            "Same-host channel: closing the connection of pid %d: %s", self.peer_pid, message
        )
        self._error(request_id, op, code, message)
        self._flush()
        self.close()

    def refuse(self, code: int, message: str) -> None:
        """Turn away a connection not yet started."""
        with contextlib.suppress(Exception):
            self.sock.send(wire.header(len(message), 0, 0, code) + message.encode())
        self.sock.close()
        self._closed = True

    def _flush(self) -> None:
        """Send what is queued, many answers per sendmsg; the rest when writable."""
        out = self._out
        while out and not self._closed:
            buffers: list[Value] = []
            fds: list[int] = []
            while out and len(buffers) < MAX_IOV:
                parts, fd, _ = out[0]
                if fd >= 0 and (buffers or fds):
                    break  # a descriptor goes with the first bytes of its own sendmsg
                buffers.extend(parts)
                if fd >= 0:
                    fds.append(fd)
                out.popleft()
                if fds:
                    break
            try:
                if fds:
                    ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))]
                    sent = self.sock.sendmsg(buffers, ancillary)
                else:
                    sent = self.sock.sendmsg(buffers)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            total = sum(len(b) if not isinstance(b, memoryview) else b.nbytes for b in buffers)
            self._queued -= sent
            if sent < total:
                # Keep what was not sent at the front; its descriptor has gone already.
                out.appendleft((_remainder(buffers, sent), -1, None))
                if not self._writing:
                    self.loop.add_writer(self.fileno, self._writable)
                    self._writing = True
                return
        if self._writing:
            self.loop.remove_writer(self.fileno)
            self._writing = False
        if len(self._tasks) < MAX_IN_FLIGHT and self._queued < MAX_QUEUED_ANSWER_BYTES:
            self._resume_reading()

    def _writable(self) -> None:
        self._flush()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pause_reading()
        if self._writing:
            self.loop.remove_writer(self.fileno)
            self._writing = False
        for task in self._tasks:
            task.cancel()
        while self._fds:
            os.close(self._fds.popleft())
        self._out.clear()
        self.sock.close()
        self.channel.connections.discard(self)
        self.core.same_host.connections = len(self.channel.connections)


def _copy(buffer: bytearray, start: int, end: int) -> bytes:
    """``buffer[start:end]`` as bytes, copied once (no export of ``buffer`` left,
    which must stay resizable)."""
    with memoryview(buffer) as view:
        return view[start:end].tobytes()


def _code(error: MemctlError) -> int:
    return int(grpc.StatusCode[error.code].value[0])


def _remainder(buffers: list[Value], sent: int) -> list[Value]:
    """What of ``buffers`` is left after the first ``sent`` bytes."""
    left: list[Value] = []
    for buffer in buffers:
        view = memoryview(buffer).cast("B")
        if sent >= view.nbytes:
            sent -= view.nbytes
            continue
        left.append(view[sent:])
        sent = 0
    return left


def _inline_get(read: ManyRead, data: Value) -> list[Value]:
    assert read.location is not None
    head = wire.encode_get_answer_head(
        read.location, read.metadata, read.size, read.crc, wire.SOURCE_INLINE
    )
    return [head, data]


def _get_many_answer(reads: list[ManyRead]) -> list[Value]:
    parts: list[Value] = [wire.encode_count(len(reads))]
    for read in reads:
        if read.location is None:
            if read.failure is not None:
                parts.append(wire.encode_failed_item(_code(read.failure), str(read.failure)))
            else:
                parts.append(wire.MISSING_ITEM)
        elif read.data is None:
            parts.append(wire.encode_large_item(read.location, read.size))
        else:
            parts.append(wire.encode_value_item(read.location, read.crc, read.metadata, read.data))
    return parts


async def _get_many_later(work: Awaitable[list[ManyRead]]) -> list[Value]:
    return _get_many_answer(await work)


async def _once(data: Value) -> Any:
    yield data


async def _first(work: Awaitable[list[Route]]) -> Route:
    return (await work)[0]


async def _put_answer(work: Awaitable[Route], size: int) -> list[Value]:
    return [wire.encode_put_answer(await work, size)]


async def _count_answer(work: Awaitable[int]) -> list[Value]:
    return [wire.encode_count(await work)]


async def _stat_answer(work: Awaitable[Any]) -> list[Value]:
    info = await work
    return [wire.encode_stat_answer(info.size, info.location, info.metadata_size)]


async def _locations_answer(work: Awaitable[list[Route]]) -> list[Value]:
    return [wire.encode_locations(await work)]
