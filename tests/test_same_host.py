"""The same-host channel against real daemons: its frames, its segments, its
/dev/shm fallback, its authentication, and how clients choose it.

Most cases speak the protocol byte by byte through ``RawChannel`` (a unix socket,
``memctl.wire``'s frames, descriptors sent as SCM_RIGHTS), as a careless or hostile
client would: the daemon must answer bad input with a status code and a one-line
message, close only connections whose frames it cannot delimit, store nothing from
a bad frame, and go on serving. What a frame did or did not store is checked over
gRPC (``grpc_client``), a path independent of the channel under test.

Authentication stays on (the daemon's token, found as its user's clients find it)
but where a test is about ``auth: none``.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import itertools
import os
import re
import secrets
import shutil
import socket
import stat
import subprocess
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import crc32c
import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from memctl import Client, wire
from memctl.errors import FailedPrecondition
from memctl.v1 import memctl_pb2 as pb
from memctl_server.auth import Authenticator
from tests.conftest import Daemon, start_daemon, stop_with_its_workers, wait_until
from tests.tokens import token_of

MiB = 1 << 20
#: Seconds a raw connection waits for an answer or a close: generous for a loaded
#: two-core machine, and what turns "the daemon never answered" into a failure.
ANSWER_DEADLINE = 15.0
#: The request id of the STAT that proves a connection is still served.
PING_ID = 0xFFFFFFFF
_ANCILLARY_SPACE = socket.CMSG_SPACE(16 * 4)
_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL


# --- a raw channel client -----------------------------------------------------------------
class Frame(NamedTuple):
    """One answer as it came off the socket."""

    request_id: int
    op: int
    status: int
    flags: int
    body: bytes
    fd: int

    @property
    def message(self) -> str:
        return self.body.decode("utf-8", "replace")


class RawChannel:
    """A same-host connection that sends exactly the bytes (and descriptors) it is
    told to; ``receive`` gives the next answer, or None once the daemon closed."""

    def __init__(self, path: str, timeout: float = ANSWER_DEADLINE):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buffer = bytearray()
        self._fds: deque[int] = deque()
        self._ids = itertools.count(1)
        self.eof = False

    def __enter__(self) -> RawChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()
        while self._fds:
            os.close(self._fds.popleft())

    def send_raw(self, data: bytes, fd: int = -1) -> None:
        if fd >= 0:
            rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))]
            sent = self.sock.sendmsg([data], rights)
            if sent < len(data):
                self.sock.sendall(data[sent:])
        else:
            self.sock.sendall(data)

    def send(
        self,
        op: int,
        body: bytes = b"",
        *,
        request_id: int | None = None,
        status: int = 0,
        flags: int | None = None,
        fd: int = -1,
    ) -> int:
        """Send one frame (FLAG_FD set when ``fd`` is given, unless ``flags`` says
        otherwise); its request id."""
        request_id = next(self._ids) if request_id is None else request_id
        if flags is None:
            flags = wire.FLAG_FD if fd >= 0 else 0
        self.send_raw(wire.header(len(body), request_id, op, status, flags) + body, fd)
        return request_id

    def receive(self) -> Frame | None:
        """The next answer; None when the daemon has closed the connection. A
        daemon that neither answers nor closes within the deadline raises
        TimeoutError."""
        while True:
            frame = self._parse()
            if frame is not None:
                return frame
            if self.eof:
                return None
            try:
                data, ancillary, _, _ = self.sock.recvmsg(256 * 1024, _ANCILLARY_SPACE)
            except ConnectionResetError:
                data, ancillary = b"", []
            self._fds.extend(wire.received_fds(ancillary))
            if not data:
                self.eof = True
            self._buffer += data

    def _parse(self) -> Frame | None:
        if len(self._buffer) < wire.HEADER_SIZE:
            return None
        length, request_id, op, status, flags = wire.HEADER.unpack_from(self._buffer)
        end = wire.HEADER_SIZE + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[wire.HEADER_SIZE : end])
        del self._buffer[:end]
        fd = self._fds.popleft() if flags & wire.FLAG_FD and self._fds else -1
        return Frame(request_id, op, status, flags, body, fd)

    def call(self, op: int, body: bytes = b"", **kwargs: int) -> Frame:
        """Send a frame and return its answer (which must come, and be its own)."""
        request_id = self.send(op, body, **kwargs)
        answer = self.receive()
        assert answer is not None, "the daemon closed the connection instead of answering"
        assert answer.request_id == request_id and answer.op == op, answer
        return answer

    def hello(self, token: str, session: str = "", scope: str = "") -> wire.Welcome:
        answer = self.call(wire.HELLO, wire.encode_hello(token, session, scope))
        assert answer.status == wire.OK, answer.message
        return wire.decode_welcome(answer.body)

    def assert_usable(self) -> None:
        """The connection is still served: a Stat of a missing key is NOT_FOUND."""
        answer = self.call(wire.STAT, wire.encode_key("same-host-test-no-such-key"))
        assert answer.status == wire.NOT_FOUND, answer

    def assert_closed(self) -> None:
        """The daemon closes the connection (whatever it answered first is read)."""
        while (answer := self.receive()) is not None:
            assert answer.status != wire.OK, f"an answer of a connection being closed: {answer}"
        assert self.eof


def assert_error(answer: Frame, code: int, *words: str) -> None:
    assert answer.status == code, (answer.status, answer.message)
    message = answer.message
    assert message and "\n" not in message and "Traceback" not in message, message
    for word in words:
        assert word in message, message


# --- daemons ------------------------------------------------------------------------------
@dataclass
class Served:
    """A daemon, its admin token and the channel its Status advertises."""

    daemon: Daemon
    token: str
    info: pb.SameHost

    @property
    def address(self) -> str:
        return self.daemon.address

    @property
    def shm(self) -> Path:
        return Path(self.info.shm_directory)

    def connect(self) -> RawChannel:
        return RawChannel(self.info.socket_path)

    def hello(self) -> RawChannel:
        """A connection that said HELLO with the admin token."""
        channel = self.connect()
        channel.hello(self.token)
        return channel

    def grpc_client(self) -> Client:
        return Client(self.address, transport="grpc", timeout=30)

    def stored(self, prefix: str = "") -> list[str]:
        with self.grpc_client() as client:
            return [info.key for info in client.list_keys(prefix)]

    def num_fds(self) -> int:
        return int(psutil.Process(self.daemon.pid).num_fds())

    def assert_serving(self) -> None:
        assert self.daemon.process.poll() is None, self.daemon.log()
        for transport in ("grpc", "same-host"):
            with Client(self.address, transport=transport, timeout=30) as client:
                key = f"alive-{transport}-{secrets.token_hex(4)}"
                client.put(key, b"still serving")
                assert client.get(key) == b"still serving"
                assert client.delete(key) == 1


def advertised(address: str, token: str | None = None) -> pb.StatusResponse:
    with Client(address, transport="grpc", token=token, timeout=30) as client:
        return client._status()


def served(daemon: Daemon) -> Served:
    status = advertised(daemon.address)
    assert status.service.HasField("same_host"), "Status does not advertise the channel"
    return Served(daemon, token_of(daemon.address), status.service.same_host)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One default daemon for the tests that change nothing but keys of their own."""
    daemon = start_daemon(tmp_path_factory.mktemp("same-host"))
    try:
        yield served(daemon)
    finally:
        stop_with_its_workers(daemon.process)
        if daemon.process.stdout is not None:
            daemon.process.stdout.close()


def sealed_memfd(data: bytes, seals: int = _SEALS) -> int:
    fd = os.memfd_create("same-host-test", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(fd, data)
    if seals:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
    return fd


def shm_file(directory: Path, data: bytes, name: str | None = None) -> Path:
    """A file as a client that cannot pass descriptors writes it: 0600, named
    ``<pid>-<anything>``."""
    path = directory / (name or f"{os.getpid()}-{secrets.token_hex(8)}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    return path


def shm_put(key: str, name: str, size: int) -> bytes:
    return wire.encode_put_head(key, b"", wire.SOURCE_SHM_FILE, size) + wire.text(name)


def inline_put(key: str, data: bytes) -> bytes:
    head = wire.encode_put_head(key, b"", wire.SOURCE_INLINE, len(data), crc32c.crc32c(data))
    return head + data


# --- the handshake ------------------------------------------------------------------------
def test_hello_answer_names_the_peer_and_the_daemon(shared: Served) -> None:
    with shared.connect() as channel:
        welcome = channel.hello(shared.token)
    assert welcome.peer_pid == os.getpid()
    assert welcome.daemon_pid == shared.daemon.pid
    assert welcome.version == wire.VERSION == shared.info.version
    assert welcome.instance_id == shared.info.instance_id != ""
    assert welcome.segment_threshold == shared.info.segment_threshold == MiB
    assert welcome.shm_directory == shared.info.shm_directory
    assert welcome.max_frame == 4 * MiB  # limits.max-message-size's default
    # Only the daemon's user reaches the socket and the shared-memory directory.
    assert stat.S_IMODE(os.stat(shared.info.socket_path).st_mode) == 0o600
    assert stat.S_ISSOCK(os.stat(shared.info.socket_path).st_mode)
    assert stat.S_IMODE(shared.shm.stat().st_mode) == 0o700


# --- bad input ----------------------------------------------------------------------------
def _text_of(raw: bytes) -> bytes:
    return len(raw).to_bytes(2, "little") + raw


MALFORMED: list[tuple[str, int, bytes]] = [
    ("Put cut inside its key", wire.PUT, inline_put("mal-put", b"abc")[:3]),
    ("Put cut inside its tail", wire.PUT, wire.encode_put_head("mal-put", b"", 0, 3)[:-2]),
    ("Put carrying less than declared", wire.PUT, inline_put("mal-put", b"abcd")[:-1]),
    ("Put carrying more than declared", wire.PUT, inline_put("mal-put", b"abc") + b"de"),
    ("Put of an unknown source", wire.PUT, wire.encode_put_head("mal-put", b"", 7, 3) + b"abc"),
    (
        "Put of a file, extra bytes",
        wire.PUT,
        shm_put("mal-put", f"{os.getpid()}-x", 3) + b"!",
    ),
    (
        "Put of a memfd, extra bytes",
        wire.PUT,
        wire.encode_put_head("mal-put", b"", wire.SOURCE_MEMFD, 3) + b"!",
    ),
    (
        "Put with a key not UTF-8",
        wire.PUT,
        _text_of(b"mal-\xff\xfe") + wire.encode_put_head("k", b"", 0, 3)[3:] + b"abc",
    ),
    ("Get without its accept byte", wire.GET, wire.encode_key("mal-get")),
    ("Get with an extra byte", wire.GET, wire.encode_get("mal-get", 0) + b"\0"),
    ("Stat of an empty body", wire.STAT, b""),
    ("Stat with an extra byte", wire.STAT, wire.encode_key("mal-stat") + b"\0"),
    ("Stat with a key longer than the body", wire.STAT, b"\xff\x00abc"),
    ("Delete of a million keys in 8 bytes", wire.DELETE, wire.encode_count(10**6) + b"\0\0\0\0"),
    ("Delete of 2 keys carrying 1", wire.DELETE, wire.encode_count(2) + wire.text("mal-del")),
    ("Delete with an extra byte", wire.DELETE, wire.encode_keys(["mal-del"]) + b"\0"),
    ("Delete of 3 bytes", wire.DELETE, b"\1\0\0"),
    (
        "PutMany cut inside its item",
        wire.PUT_MANY,
        (wire.encode_count(1) + wire.encode_put_item("mal-many", b"abc", b"", None))[:-1],
    ),
    (
        "PutMany with an extra byte",
        wire.PUT_MANY,
        wire.encode_count(1) + wire.encode_put_item("mal-many", b"abc", b"", None) + b"\0",
    ),
    ("PutMany of 2**32-1 items", wire.PUT_MANY, b"\xff\xff\xff\xff" + b"\0" * 20),
    ("GetMany with an extra byte", wire.GET_MANY, wire.encode_keys(["mal-gm"]) + b"\0"),
    ("GetMany cut inside its key", wire.GET_MANY, wire.encode_keys(["mal-gm"])[:-2]),
    ("Hello again, well formed", wire.HELLO, wire.encode_hello("anything")),
    ("Hello again, cut", wire.HELLO, b"\1"),
]


def _op_word(op: int) -> str:
    return "HELLO" if op == wire.HELLO else wire.OP_NAMES[op]


def test_malformed_bodies_are_invalid_argument_and_the_connection_goes_on(
    shared: Served,
) -> None:
    with shared.hello() as channel:
        for what, op, body in MALFORMED:
            answer = channel.call(op, body)
            assert answer.status == wire.INVALID_ARGUMENT, (what, answer.status, answer.message)
            assert_error(answer, wire.INVALID_ARGUMENT, _op_word(op))
        channel.assert_usable()
        # A request carrying a status, or a flag no version defines, is refused too.
        answer = channel.call(wire.STAT, wire.encode_key("mal-stat"), status=wire.NOT_FOUND)
        assert_error(answer, wire.INVALID_ARGUMENT, "status")
        answer = channel.call(wire.STAT, wire.encode_key("mal-stat"), flags=0x8)
        assert_error(answer, wire.INVALID_ARGUMENT, "flags")
        # And a well-formed Put on the same connection still stores.
        answer = channel.call(wire.PUT, inline_put("mal-good", b"fine"))
        assert answer.status == wire.OK, answer.message
        assert wire.decode_put_answer(answer.body) == ("memory", 4)
    assert shared.stored("mal-") == ["mal-good"]
    with shared.grpc_client() as client:
        assert client.get("mal-good") == b"fine"
        client.delete("mal-good")


@pytest.mark.parametrize("op", [0, 8, 99, 255])
def test_unknown_operation_is_unimplemented(shared: Served, op: int) -> None:
    with shared.hello() as channel:
        answer = channel.call(op, b"whatever")
        assert_error(answer, wire.UNIMPLEMENTED, str(op))
        channel.assert_usable()


@pytest.mark.parametrize("excess", [1, 0xFFFFFFFF - 4 * MiB])
def test_frame_longer_than_max_frame_is_answered_and_closed(shared: Served, excess: int) -> None:
    with shared.hello() as channel:
        channel.send_raw(wire.header(4 * MiB + excess, 77, wire.PUT))
        answer = channel.receive()
        assert answer is not None
        assert (answer.request_id, answer.op) == (77, wire.PUT)
        assert_error(answer, wire.RESOURCE_EXHAUSTED, "max-message-size")
        channel.assert_closed()
    shared.assert_serving()


def test_operation_before_hello_is_unauthenticated_and_closed(shared: Served) -> None:
    with shared.connect() as channel:
        answer = channel.call(wire.PUT, inline_put("early-put", b"abc"))
        assert_error(answer, wire.UNAUTHENTICATED, "HELLO")
        channel.assert_closed()
    with shared.connect() as channel:
        answer = channel.call(wire.STAT, wire.encode_key("early-put"))
        assert_error(answer, wire.UNAUTHENTICATED, "HELLO")
        channel.assert_closed()
    assert shared.stored("early-") == []


@pytest.mark.parametrize(
    "token",
    ["", "not-this-daemons-token", "w.d29ya2Vy.0123456789abcdef", "w.!!!.x"],
    ids=["empty", "wrong", "forged-worker", "garbled-worker"],
)
def test_wrong_token_is_unauthenticated(shared: Served, token: str) -> None:
    with shared.connect() as channel:
        answer = channel.call(wire.HELLO, wire.encode_hello(token))
        assert_error(answer, wire.UNAUTHENTICATED, "token")
        assert shared.token not in answer.message
        channel.assert_closed()


class FdKind(NamedTuple):
    """A descriptor a PUT of ``declared`` bytes passes as its memfd."""

    name: str
    make: Callable[[Path], int]
    declared: int


def _regular_file(tmp: Path) -> int:
    path = tmp / "regular"
    path.write_bytes(b"r" * 4096)
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


def _pipe(tmp: Path) -> int:
    read, write = os.pipe()
    os.close(write)
    return read


NOT_SEALED_MEMFDS = [
    FdKind("unsealed", lambda _: sealed_memfd(b"u" * 4096, seals=0), 4096),
    FdKind(
        "sealed-against-writes-only",
        lambda _: sealed_memfd(b"w" * 4096, seals=fcntl.F_SEAL_WRITE),
        4096,
    ),
    FdKind(
        "sealed-but-growable",
        lambda _: sealed_memfd(b"g" * 4096, seals=fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SHRINK),
        4096,
    ),
    FdKind("sealed-smaller-than-declared", lambda _: sealed_memfd(b"s" * 4096), 4097),
    FdKind("sealed-larger-than-declared", lambda _: sealed_memfd(b"l" * 4096), 4095),
    FdKind("sealed-empty", lambda _: sealed_memfd(b""), 0),
    FdKind("regular-file", _regular_file, 4096),
    FdKind("pipe", _pipe, 4096),
]
_BAD_FD_IDS = [kind.name for kind in NOT_SEALED_MEMFDS]


@pytest.mark.parametrize("kind", NOT_SEALED_MEMFDS, ids=_BAD_FD_IDS)
def test_memfd_put_of_a_bad_descriptor_is_invalid_argument(
    shared: Served, kind: FdKind, tmp_path: Path
) -> None:
    key = f"badfd-{kind.name}"
    with shared.hello() as channel:
        fd = kind.make(tmp_path)
        try:
            head = wire.encode_put_head(key, b"", wire.SOURCE_MEMFD, kind.declared)
            answer = channel.call(wire.PUT, head, fd=fd)
        finally:
            os.close(fd)
        assert_error(answer, wire.INVALID_ARGUMENT, key)
        channel.assert_usable()


@pytest.mark.parametrize("kind", NOT_SEALED_MEMFDS, ids=_BAD_FD_IDS)
def test_memfd_put_of_a_bad_descriptor_stores_nothing_and_leaks_nothing(
    shared: Served, kind: FdKind, tmp_path: Path
) -> None:
    key = f"badfd-{kind.name}"
    baseline = shared.num_fds()
    for _ in range(3):
        with shared.hello() as channel:
            fd = kind.make(tmp_path)
            try:
                head = wire.encode_put_head(key, b"", wire.SOURCE_MEMFD, kind.declared)
                channel.send(wire.PUT, head, fd=fd)
            finally:
                os.close(fd)
            answer = channel.receive()
            assert answer is None or answer.status == wire.INVALID_ARGUMENT, answer
    assert shared.stored(key) == []
    # The daemon's copies of the descriptors (and the connections) are closed.
    wait_until(lambda: shared.num_fds() <= baseline, timeout=20)
    shared.assert_serving()


def test_descriptor_where_no_memfd_belongs_is_invalid_argument(shared: Served) -> None:
    baseline = shared.num_fds()
    with shared.hello() as channel:
        fd = sealed_memfd(b"v" * 4096)
        try:
            # An inline Put carrying a descriptor besides.
            answer = channel.call(wire.PUT, inline_put("stray-inline", b"v" * 16), fd=fd)
            assert_error(answer, wire.INVALID_ARGUMENT, "not a memfd")
            # A Get carrying one.
            answer = channel.call(wire.GET, wire.encode_get("stray-get", 0), fd=fd)
            assert_error(answer, wire.INVALID_ARGUMENT, "only Put")
        finally:
            os.close(fd)
        # A memfd Put whose descriptor never came (no FLAG_FD, no SCM_RIGHTS).
        head = wire.encode_put_head("stray-missing", b"", wire.SOURCE_MEMFD, 4096)
        answer = channel.call(wire.PUT, head)
        assert_error(answer, wire.INVALID_ARGUMENT, "memfd")
        channel.assert_usable()
    assert shared.stored("stray-") == []
    wait_until(lambda: shared.num_fds() <= baseline, timeout=20)


def test_flag_fd_without_a_descriptor_closes_the_connection(shared: Served) -> None:
    with shared.hello() as channel:
        head = wire.encode_put_head("flagfd-put", b"", wire.SOURCE_MEMFD, 4096)
        channel.send(wire.PUT, head, flags=wire.FLAG_FD)
        answer = channel.receive()
        assert answer is not None
        assert_error(answer, wire.INVALID_ARGUMENT, "descriptor")
        channel.assert_closed()
    assert shared.stored("flagfd-") == []
    shared.assert_serving()


def test_descriptor_no_frame_claims_closes_the_connection(shared: Served) -> None:
    baseline = shared.num_fds()
    with shared.hello() as channel:
        fd = sealed_memfd(b"x" * 4096)
        try:
            channel.send(wire.STAT, wire.encode_key("unclaimed"), flags=0, fd=fd)
        finally:
            os.close(fd)
        channel.assert_closed()
    wait_until(lambda: shared.num_fds() <= baseline, timeout=20)
    shared.assert_serving()


class ShmCase(NamedTuple):
    """A /dev/shm Put naming ``name`` for ``declared`` bytes (0: the size of the file
    made); ``prepare(shm, outside, name)`` makes what the name is (in the daemon's
    directory ``shm``; ``outside``: a directory elsewhere) and returns the files that
    must be left as they were."""

    name: str
    declared: int
    prepare: Callable[[Path, Path, str], list[Path]]


def _nothing(shm: Path, outside: Path, name: str) -> list[Path]:
    return []


def _beside(shm: Path, outside: Path, name: str) -> list[Path]:
    """A file beside the daemon's directory, which ``name`` reaches with ``../``."""
    victim = shm / name
    victim.write_bytes(b"o" * 4096)
    return [victim]


def _nested(shm: Path, outside: Path, name: str) -> list[Path]:
    (shm / name).parent.mkdir()
    (shm / name).write_bytes(b"n" * 4096)
    return [shm / name]


def _symlink(shm: Path, outside: Path, name: str) -> list[Path]:
    target = outside / "target"
    target.write_bytes(b"t" * 4096)
    (shm / name).symlink_to(target)
    return [target]


def _file_of(size: int) -> Callable[[Path, Path, str], list[Path]]:
    def make(shm: Path, outside: Path, name: str) -> list[Path]:
        return [shm_file(shm, b"z" * size, name)]

    return make


def _directory(shm: Path, outside: Path, name: str) -> list[Path]:
    (shm / name).mkdir()
    return []


def _fifo(shm: Path, outside: Path, name: str) -> list[Path]:
    os.mkfifo(shm / name, 0o600)  # opened without O_NONBLOCK, it would hang the daemon
    return []


PID = os.getpid()
BAD_SHM_CASES = {
    "dotdot": ShmCase(f"../memctl-test-victim-{PID}", 0, _beside),
    "nested": ShmCase(f"{PID}-a/b", 0, _nested),
    "parent": ShmCase("..", 4096, _nothing),
    "itself": ShmCase(".", 4096, _nothing),
    "empty-name": ShmCase("", 4096, _nothing),
    "nul": ShmCase(f"{PID}-x\0y", 4096, _nothing),
    "missing": ShmCase(f"{PID}-missing", 4096, _nothing),
    "symlink": ShmCase(f"{PID}-link", 4096, _symlink),
    "larger-than-file": ShmCase(f"{PID}-larger", 4097, _file_of(4096)),
    "smaller-than-file": ShmCase(f"{PID}-smaller", 4095, _file_of(4096)),
    "empty-file": ShmCase(f"{PID}-empty", 0, _file_of(0)),
    "directory": ShmCase(f"{PID}-dir", 4096, _directory),
    "fifo": ShmCase(f"{PID}-fifo", 4096, _fifo),
}


@pytest.mark.parametrize("case", BAD_SHM_CASES.values(), ids=BAD_SHM_CASES.keys())
def test_shm_put_of_a_bad_file_is_invalid_argument(
    shared: Served, case: ShmCase, tmp_path: Path
) -> None:
    key = f"shm-bad-{secrets.token_hex(4)}"
    made = {entry.name for entry in shared.shm.iterdir()}
    try:
        kept = case.prepare(shared.shm, tmp_path, case.name)
        before = {path: path.read_bytes() for path in kept}
        declared = case.declared or len(before[kept[0]])
        with shared.hello() as channel:
            answer = channel.call(wire.PUT, shm_put(key, case.name, declared))
            assert_error(answer, wire.INVALID_ARGUMENT, key)
            channel.assert_usable()
        assert shared.stored(key) == []
        for path, content in before.items():
            assert path.read_bytes() == content, f"{path} was changed"
    finally:
        (shared.shm.parent / f"memctl-test-victim-{PID}").unlink(missing_ok=True)
        for entry in shared.shm.iterdir():
            if entry.name not in made:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()


def test_shm_put_cannot_take_the_daemons_lock_file(spawn: Callable[..., Daemon]) -> None:
    daemon = served(spawn())  # its own: the bug removes the lock file
    lock = daemon.shm / "memctl.lock"
    content = lock.read_bytes()
    with daemon.hello() as channel:
        answer = channel.call(wire.PUT, shm_put("lock", "memctl.lock", len(content)))
        assert lock.exists(), "the daemon unlinked its own lock file"
        assert_error(answer, wire.INVALID_ARGUMENT, "lock")
    assert daemon.stored() == []


@pytest.mark.skipif(os.geteuid() != 0, reason="making another user's file takes root")
def test_shm_put_of_another_users_file_is_invalid_argument(shared: Served) -> None:
    path = shm_file(shared.shm, b"q" * 4096)
    os.chown(path, 65534, 65534)
    try:
        with shared.hello() as channel:
            answer = channel.call(wire.PUT, shm_put("shm-other-user", path.name, 4096))
            assert_error(answer, wire.INVALID_ARGUMENT, "uid 65534")
        assert path.exists()
        assert shared.stored("shm-other-user") == []
    finally:
        path.unlink(missing_ok=True)


def test_client_vanishing_mid_frame_leaves_the_daemon_unharmed(shared: Served) -> None:
    baseline = shared.num_fds()
    hello = wire.encode_hello(shared.token)
    put = inline_put("vanish-inline", os.urandom(64 * 1024))
    fd = sealed_memfd(b"m" * 8192)
    head = wire.encode_put_head("vanish-memfd", b"", wire.SOURCE_MEMFD, 8192)
    memfd_put = wire.header(len(head), 1, wire.PUT, 0, wire.FLAG_FD) + head
    try:
        halves: list[tuple[bool, bytes, int]] = [
            (False, (wire.header(len(hello), 1, wire.HELLO) + hello)[:20], -1),  # half a HELLO
            (True, wire.header(len(put), 2, wire.PUT)[:5], -1),  # half a header
            (True, wire.header(len(put), 2, wire.PUT), -1),  # a header alone
            (True, (wire.header(len(put), 2, wire.PUT) + put)[: len(put) // 2], -1),
            (True, memfd_put[:-4], fd),  # its descriptor arrived, its frame did not
        ]
        for said_hello, data, descriptor in halves:
            channel = shared.hello() if said_hello else shared.connect()
            channel.send_raw(data, descriptor)
            channel.close()
    finally:
        os.close(fd)
    wait_until(lambda: shared.num_fds() <= baseline, timeout=20)
    assert shared.stored("vanish-") == []
    shared.assert_serving()


# --- random frames ------------------------------------------------------------------------
#: Keys and names of a small alphabet: collisions, and no way to spell memctl.lock.
KEYS = st.text(alphabet="ab-/é\0", max_size=5)
NAMES = st.text(alphabet="01-ab./\0", max_size=6)
U32 = st.integers(0, 0xFFFFFFFF)


@st.composite
def bodies(draw: st.DrawFn, op: int) -> bytes:
    """A body for ``op``: random bytes, or its fields encoded with random values (so
    that decoding gets past the first field), then perhaps cut or extended."""
    if draw(st.integers(0, 3)) == 0:
        return draw(st.binary(max_size=64))
    key = draw(KEYS)
    metadata = draw(st.binary(max_size=8))
    body: bytes
    if op == wire.PUT:
        source = draw(st.sampled_from([0, 0, 1, 2, 3, 255]))
        data = draw(st.binary(max_size=48))
        size = draw(st.one_of(st.just(len(data)), st.integers(0, (1 << 64) - 1)))
        crc = draw(st.one_of(st.none(), st.just(crc32c.crc32c(data)), U32))
        body = wire.encode_put_head(key, metadata, source, size, crc)
        if source == wire.SOURCE_INLINE:
            body += data
        elif source == wire.SOURCE_SHM_FILE:
            body += wire.text(draw(NAMES))
    elif op == wire.GET:
        body = wire.encode_get(key, draw(st.integers(0, 255)))
    elif op in (wire.DELETE, wire.GET_MANY):
        body = wire.encode_keys(draw(st.lists(KEYS, max_size=4)))
    elif op == wire.STAT:
        body = wire.encode_key(key)
    elif op == wire.PUT_MANY:
        items = draw(st.lists(st.tuples(KEYS, st.binary(max_size=16), st.booleans()), max_size=3))
        body = wire.encode_count(draw(st.one_of(st.just(len(items)), U32))) + b"".join(
            wire.encode_put_item(k, v, metadata, crc32c.crc32c(v) if good else 0)
            for k, v, good in items
        )
    elif op == wire.HELLO:
        body = wire.encode_hello(draw(st.text(max_size=8)), draw(KEYS), draw(KEYS))
    else:
        body = draw(st.binary(max_size=64))
    change = draw(st.sampled_from(["keep", "keep", "cut", "extend"]))
    if change == "cut" and body:
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif change == "extend":
        body += draw(st.binary(min_size=1, max_size=8))
    return body


class RandomFrame(NamedTuple):
    request_id: int
    op: int
    status: int
    flags: int
    body: bytes
    #: Declared beyond max_frame (the body is not sent): the connection must close.
    lying_length: int | None
    #: "memfd", "unsealed" or "file": a descriptor sent with the frame.
    descriptor: str | None


@st.composite
def random_frames(draw: st.DrawFn) -> RandomFrame:
    op = draw(st.one_of(st.integers(1, 7), st.integers(1, 7), st.integers(0, 255)))
    return RandomFrame(
        request_id=draw(st.integers(1, PING_ID - 1)),  # 0: the daemon's closing words
        op=op,
        status=draw(st.one_of(st.just(0), st.just(0), st.just(0), st.integers(0, 255))),
        flags=draw(st.sampled_from([0, 0, 0, wire.FLAG_FD, 0x2, 0xFFFF])),
        body=draw(bodies(op)),
        lying_length=draw(
            st.one_of(*[st.none()] * 9, st.integers(4 * MiB + 1, 0xFFFFFFFF)),
        ),
        descriptor=draw(st.sampled_from([None, None, None, None, "memfd", "unsealed", "file"])),
    )


def _descriptor(kind: str | None, tmp: Path) -> int:
    if kind == "memfd":
        return sealed_memfd(b"d" * 100)
    if kind == "unsealed":
        return sealed_memfd(b"d" * 100, seals=0)
    if kind == "file":
        return os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return -1


def _keys_a_put_may_store(frame: RandomFrame) -> list[str]:
    """The keys a frame could store if the daemon took it as well formed."""
    if frame.lying_length is not None:
        return []
    try:
        if frame.op == wire.PUT:
            return [wire.decode_put(frame.body).key]
        if frame.op == wire.PUT_MANY:
            return [item.key for item in wire.decode_put_many(frame.body)]
    except (wire.FrameError, ValueError):
        return []
    return []


def _exchange(served: Served, frames: list[RandomFrame], tmp: Path) -> None:
    """Send ``frames`` after a HELLO, then a Stat; every frame must be answered, once,
    or the connection closed, within the deadline."""
    with served.hello() as channel:
        sent: list[int] = []
        try:
            for frame in frames:
                fd = _descriptor(frame.descriptor, tmp)
                try:
                    length = frame.lying_length
                    body = frame.body if length is None else b""
                    head = wire.header(
                        len(body) if length is None else length,
                        frame.request_id,
                        frame.op,
                        frame.status,
                        frame.flags,
                    )
                    channel.send_raw(head + body, fd)
                finally:
                    if fd >= 0:
                        os.close(fd)
                sent.append(frame.request_id)
                if frame.lying_length is not None:
                    break
            else:
                channel.send(wire.STAT, wire.encode_key("fuzz-ping"), request_id=PING_ID)
                sent.append(PING_ID)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed by an earlier frame: what is left to read says why
        unanswered = Counter(sent)
        while unanswered.total():
            answer = channel.receive()  # TimeoutError: neither an answer nor a close
            if answer is None:
                break  # closed: by a frame it could not go on after
            assert answer.status not in (2, wire.INTERNAL), answer  # UNKNOWN, INTERNAL
            if answer.status != wire.OK:
                assert "\n" not in answer.message and "Traceback" not in answer.message
            if answer.fd >= 0:
                os.close(answer.fd)
            if answer.request_id == 0:
                # Why the connection closes (a descriptor missing, or one too many).
                assert answer.status != wire.OK, answer
                assert channel.receive() is None, "the daemon went on after its last words"
                break
            assert unanswered[answer.request_id] > 0, f"an answer to no request: {answer}"
            unanswered[answer.request_id] -= 1


def test_random_frames_are_answered_or_closed_and_the_daemon_lives(
    shared: Served, tmp_path: Path
) -> None:
    before = set(shared.stored())
    may_store: set[str] = set()

    @settings(
        max_examples=200,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.lists(random_frames(), min_size=1, max_size=4))
    def exchange(frames: list[RandomFrame]) -> None:
        for frame in frames:
            may_store.update(_keys_a_put_may_store(frame))
        _exchange(shared, frames, tmp_path)
        assert shared.daemon.process.poll() is None, shared.daemon.log()

    exchange()
    shared.assert_serving()
    assert set(shared.stored()) - before <= may_store
    assert unexpected_errors(shared.daemon.log()) == []


def unexpected_errors(log: str) -> list[str]:
    """The ERROR records of a daemon's log, with their tracebacks."""
    records = re.split(r"\n(?=\d{4}-\d\d-\d\d )", log)
    return [record for record in records if " ERROR " in record.split("\n", 1)[0]]


# --- segments -----------------------------------------------------------------------------
def _managed(client: Client) -> int:
    return client.status().service.managed


def test_segment_round_trip_view_and_accounting(daemon: Daemon) -> None:
    info = served(daemon).info
    threshold = info.segment_threshold
    with (
        Client(daemon.address, transport="same-host", timeout=30) as client,
        Client(daemon.address, transport="grpc", timeout=30) as over_grpc,
    ):
        # Both sides of the threshold round-trip, over both transports.
        for size in (threshold - 1, threshold, 3 * threshold + 5):
            value = os.urandom(size)
            result = client.put(f"edge-{size}", value, metadata=b"meta")
            assert (result.size, result.location) == (size, "memory")
            assert client.get(f"edge-{size}") == value
            assert over_grpc.get_value(f"edge-{size}").data == value
            assert over_grpc.get_value(f"edge-{size}").metadata == b"meta"
            assert client.stat(f"edge-{size}").size == size
            assert client.delete(f"edge-{size}") == 1

        managed = _managed(over_grpc)
        value = os.urandom(8 * MiB)
        client.put("seg", value)
        assert _managed(over_grpc) >= managed + len(value)
        view = client.get_view("seg")
        assert view.readonly and view.nbytes == len(value)
        assert view == value
        with pytest.raises(TypeError):
            view[0] = 1
        assert client.delete("seg") == 1
        with pytest.raises(KeyError):
            client.get("seg")
        # The mapping outlives the key...
        assert view == value
        wait_until(lambda: _managed(over_grpc) <= managed, timeout=20)
        assert view == value

        # ...and its replacement.
        first, second = os.urandom(4 * MiB), os.urandom(4 * MiB)
        client.put("replaced", first)
        old = client.get_view("replaced")
        client.put("replaced", second)
        assert client.get("replaced") == second
        assert old == first
        assert over_grpc.get("replaced") == second
        # A segment put over gRPC comes back as one too.
        over_grpc.put("from-grpc", first)
        assert client.get_view("from-grpc") == first
        old.release()
        view.release()


def test_segment_is_not_copied_into_the_daemon(daemon: Daemon) -> None:
    value = os.urandom(64 * MiB)
    with Client(daemon.address, transport="same-host", timeout=60) as client:
        client.put("warm-up", b"w" * MiB * 2)  # the connection open, its buffers made
        before = daemon.rss()
        client.put("big", value)
        grown = daemon.rss() - before
        assert grown < len(value) // 2, f"the daemon's RSS grew by {grown} bytes"
        assert client.get_view("big") == value


def test_segments_spill_to_disk_and_read_back(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "256MiB")
    count, size = 6, 64 * MiB
    digests: dict[str, bytes] = {}
    with Client(daemon.address, transport="same-host", timeout=120) as client:
        for i in range(count):
            value = os.urandom(size)
            digests[f"spill-{i}"] = hashlib.blake2b(value).digest()
            assert client.put(f"spill-{i}", value).size == size
            del value
        service = client.status().service
        assert service.keys_in_memory + service.keys_on_disk == count
        assert service.keys_on_disk >= 1 and service.spilled >= size, service
        for key, digest in digests.items():
            view = client.get_view(key)
            assert view.nbytes == size
            assert hashlib.blake2b(view).digest() == digest, key
            view.release()
    with Client(daemon.address, transport="grpc", timeout=120) as over_grpc:
        for key, digest in digests.items():
            assert hashlib.blake2b(over_grpc.get(key)).digest() == digest, key


# --- the /dev/shm fallback ----------------------------------------------------------------
SEGMENT_SIZES = [
    pytest.param(10, id="10B"),
    pytest.param(4096, id="4KiB"),
    pytest.param(4097, id="4KiB+1"),
    pytest.param(3 * MiB + 1, id="3MiB+1"),
]


@pytest.mark.parametrize("size", SEGMENT_SIZES)
@pytest.mark.parametrize("source", ["memfd", "shm-file"])
def test_value_put_as_a_memfd_or_shm_file_reads_back(
    shared: Served, source: str, size: int
) -> None:
    key = f"taken-{source}-{size}"
    value = os.urandom(size)
    with shared.hello() as channel:
        if source == "memfd":
            fd = sealed_memfd(value)
            try:
                head = wire.encode_put_head(key, b"", wire.SOURCE_MEMFD, size)
                answer = channel.call(wire.PUT, head, fd=fd)
            finally:
                os.close(fd)
        else:
            path = shm_file(shared.shm, value)
            answer = channel.call(wire.PUT, shm_put(key, path.name, size))
            assert not path.exists(), "the daemon left the client's file behind"
        assert answer.status == wire.OK, answer.message
        assert wire.decode_put_answer(answer.body) == ("memory", size)
    try:
        with shared.grpc_client() as client:
            assert client.get(key) == value
        with Client(shared.address, transport="same-host", timeout=30) as client:
            assert client.get_view(key) == value
            assert client.get(key) == value
    finally:
        with shared.grpc_client() as client:
            client.delete(key)


def test_value_at_a_4kib_segment_threshold_reads_back(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--set", "same-host.segment-threshold=4KiB")
    value = os.urandom(4096)
    with Client(daemon.address, transport="same-host", timeout=30) as client:
        client.put("at-threshold", value)  # a memfd: 4096 bytes is the threshold
        assert client.get("at-threshold") == value
    with Client(daemon.address, transport="grpc", timeout=30) as client:
        assert client.get("at-threshold") == value


def test_sweep_removes_files_of_dead_writers_only(shared: Served) -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = shm_file(shared.shm, b"mine")
    orphan = shm_file(shared.shm, b"orphaned", f"{dead.pid}-{secrets.token_hex(8)}")
    try:
        wait_until(lambda: not orphan.exists(), timeout=30, interval=0.2)
        assert alive.read_bytes() == b"mine"  # its writer (this process) lives
        assert (shared.shm / "memctl.lock").exists()
    finally:
        alive.unlink(missing_ok=True)
        orphan.unlink(missing_ok=True)


# --- authentication -----------------------------------------------------------------------
def test_worker_token_reaches_only_its_own_session(shared: Served) -> None:
    worker_token = Authenticator(shared.token, None).worker_token("sh-worker")
    with shared.connect() as channel:
        answer = channel.call(wire.HELLO, wire.encode_hello(worker_token))
        assert_error(answer, wire.PERMISSION_DENIED, "sh-worker")
        # The refused HELLO authenticated nothing.
        answer = channel.call(wire.PUT, inline_put("sh-worker-key", b"x"))
        assert_error(answer, wire.UNAUTHENTICATED, "HELLO")
    with shared.connect() as channel:
        answer = channel.call(wire.HELLO, wire.encode_hello(worker_token, scope="service"))
        assert_error(answer, wire.PERMISSION_DENIED, "scope")
    with Client(shared.address, token=worker_token, transport="grpc", timeout=30) as client:
        session = client.attach("sh-worker", memory_limit=None)
        try:
            with shared.connect() as channel:
                channel.hello(worker_token, session=session.session_id)
                answer = channel.call(wire.PUT, inline_put("sh-worker-key", b"own data"))
                assert answer.status == wire.OK, answer.message
            with Client(shared.address, scope="sh-worker", transport="grpc") as admin:
                assert admin.get("sh-worker-key") == b"own data"
        finally:
            session.close()
    assert shared.stored("sh-worker") == []  # not in the service's scope


def test_auth_none_accepts_an_empty_token(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--auth", "none")
    status = advertised(daemon.address, token="")
    info = status.service.same_host
    with RawChannel(info.socket_path) as channel:
        welcome = channel.hello("")
        assert welcome.instance_id == info.instance_id
        answer = channel.call(wire.PUT, inline_put("open", b"no token"))
        assert answer.status == wire.OK, answer.message
    with Client(daemon.address, transport="same-host", token="", timeout=30) as client:
        assert client.get("open") == b"no token"


def test_connections_past_max_connections_are_refused(spawn: Callable[..., Daemon]) -> None:
    daemon = served(spawn("--set", "same-host.max-connections=2"))
    first, second = daemon.hello(), daemon.hello()
    try:
        with daemon.connect() as third:
            answer = third.receive()
            assert answer is not None and answer.request_id == 0
            assert_error(answer, wire.RESOURCE_EXHAUSTED, "max-connections")
            third.assert_closed()
        first.assert_usable()
        second.close()
        wait_until(lambda: _accepted(daemon), timeout=20)
    finally:
        first.close()
        second.close()


def _accepted(daemon: Served) -> bool:
    with daemon.connect() as channel:
        answer = channel.call(wire.HELLO, wire.encode_hello(daemon.token))
        return answer.status == wire.OK


# --- choosing the transport ---------------------------------------------------------------
def test_same_host_transport_needs_the_channel(
    spawn: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon = spawn("--set", "same-host.enabled=false")
    assert not advertised(daemon.address).service.HasField("same_host")
    with Client(daemon.address, transport="same-host", timeout=30) as client:
        with pytest.raises(FailedPrecondition, match="same-host"):
            client.put("forced", b"x")
        with pytest.raises(FailedPrecondition):
            client.get("forced")
    monkeypatch.setenv("MEMCTL_TRANSPORT", "same-host")
    with Client(daemon.address, timeout=30) as client, pytest.raises(FailedPrecondition):
        client.stat("forced")
    monkeypatch.setenv("MEMCTL_TRANSPORT", "auto")
    with Client(daemon.address, timeout=30) as client:
        value = os.urandom(2 * MiB)
        client.put("auto", value)
        assert client.get("auto") == value
        assert client.get_view("auto") == value
    with Client(daemon.address, transport="grpc", timeout=30) as client:
        assert [info.key for info in client.list_keys()] == ["auto"]


def test_auto_transport_uses_the_channel_when_there_is_one(shared: Served) -> None:
    with Client(shared.address, transport="auto", timeout=30) as client:
        client.put("auto-channel", b"v" * (2 * MiB))
        connection = client._same_host.current()
        assert connection is not None
        assert connection.welcome.instance_id == shared.info.instance_id
        assert client.delete("auto-channel") == 1
