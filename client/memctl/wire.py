"""The same-host channel's frames, byte by byte: shared by the daemon and the client.

``protos/SAME_HOST.md`` is the specification; this module is its Python spelling.
Every frame is a 12-byte header and a body::

    length u32 | request id u32 | op u8 | status u8 | flags u16 | body (length bytes)

little-endian throughout. Requests carry status 0; an answer echoes the request's id
and op, with status 0 and the op's answer body, or a gRPC status code and a one-line
UTF-8 message. ``FLAG_FD`` says one file descriptor (a memfd) travels with the
frame as SCM_RIGHTS ancillary data.

Strings are ``u16 length + UTF-8``, byte strings ``u32 length + bytes``. Decoding
raises ``FrameError`` for any body that does not parse, so that a malformed frame
becomes INVALID_ARGUMENT, never an exception of another kind.
"""

from __future__ import annotations

import array
import mmap
import socket
import struct
from collections.abc import Sequence
from typing import NamedTuple

#: Bytes an answer may carry a value as (a daemon's segment is an ``mmap``).
Buffer = bytes | bytearray | memoryview | mmap.mmap

#: The protocol version this module speaks; HELLO agrees on one.
VERSION = 1

HEADER = struct.Struct("<IIBBH")
HEADER_SIZE = HEADER.size

# Operations.
HELLO = 1
PUT = 2
GET = 3
DELETE = 4
STAT = 5
PUT_MANY = 6
GET_MANY = 7
OP_NAMES = {
    HELLO: "Hello",
    PUT: "Put",
    GET: "Get",
    DELETE: "Delete",
    STAT: "Stat",
    PUT_MANY: "PutMany",
    GET_MANY: "GetMany",
}

#: A file descriptor travels with this frame (SCM_RIGHTS).
FLAG_FD = 0x1
KNOWN_FLAGS = FLAG_FD

# Where a Put's value is (PUT's ``source``), and how a Get's answer carries it.
SOURCE_INLINE = 0
SOURCE_MEMFD = 1
SOURCE_SHM_FILE = 2
#: GET's ``accept`` bit: the client takes a sealed memfd for a large value.
ACCEPT_MEMFD = 0x1

# Locations, numbered as memctl.v1.Location.
LOCATION_MEMORY = 1
LOCATION_DISK = 2
LOCATIONS = {LOCATION_MEMORY: "memory", LOCATION_DISK: "disk"}
LOCATION_NUMBERS = {"memory": LOCATION_MEMORY, "disk": LOCATION_DISK}

# GET_MANY answer item states.
ITEM_MISSING = 0
ITEM_VALUE = 1
ITEM_TOO_LARGE = 2
ITEM_FAILED = 3

#: Status codes (google.rpc.Code) the daemon answers with.
OK = 0
INVALID_ARGUMENT = 3
NOT_FOUND = 5
PERMISSION_DENIED = 7
RESOURCE_EXHAUSTED = 8
FAILED_PRECONDITION = 9
UNIMPLEMENTED = 12
INTERNAL = 13
UNAVAILABLE = 14
DATA_LOSS = 15
UNAUTHENTICATED = 16

_U8 = struct.Struct("<B")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_PUT_TAIL = struct.Struct("<BBIQ")  # source, has_crc, crc, size
_GET_HEAD = struct.Struct("<QIB")  # size, crc, form (after location and metadata)
_STAT = struct.Struct("<QBI")
_HELLO_ANSWER = struct.Struct("<HIIIQ")
_PUT_ANSWER = struct.Struct("<BQ")
_ITEM_HEAD = struct.Struct("<BI")  # has_crc, crc (PUT_MANY items, after metadata)
_VALUE_ITEM = struct.Struct("<BBI")  # state, location, crc
_LARGE_ITEM = struct.Struct("<BBQ")  # state, location, size


class FrameError(ValueError):
    """A frame body that does not parse; the message says where."""


def received_fds(ancillary: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors an SCM_RIGHTS message of ``recvmsg``'s ancillary data brought."""
    fds = array.array("i")
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    return list(fds)


def header(length: int, request_id: int, op: int, status: int = OK, flags: int = 0) -> bytes:
    return HEADER.pack(length, request_id, op, status, flags)


class Reader:
    """Reads a body's fields in order; ``FrameError`` past its end."""

    __slots__ = ("buf", "pos")

    def __init__(self, buf: bytes | memoryview):
        self.buf = buf
        self.pos = 0

    def _take(self, size: int) -> int:
        start = self.pos
        end = start + size
        if end > len(self.buf):
            raise FrameError(f"the body ends at byte {len(self.buf)}, a field needs {end}")
        self.pos = end
        return start

    def u8(self) -> int:
        return int(self.buf[self._take(1)])

    def u16(self) -> int:
        return int(_U16.unpack_from(self.buf, self._take(2))[0])

    def u32(self) -> int:
        return int(_U32.unpack_from(self.buf, self._take(4))[0])

    def u64(self) -> int:
        return int(_U64.unpack_from(self.buf, self._take(8))[0])

    def struct(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack_from(self.buf, self._take(layout.size))

    def raw(self, size: int) -> bytes | memoryview:
        start = self._take(size)
        return self.buf[start : start + size]

    def text(self) -> str:
        data = self.raw(self.u16())
        try:
            return bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise FrameError(f"a string field at byte {self.pos} is not UTF-8") from None

    def blob(self) -> bytes:
        return bytes(self.raw(self.u32()))

    def rest(self) -> bytes | memoryview:
        return self.raw(len(self.buf) - self.pos)

    def end(self) -> None:
        if self.pos != len(self.buf):
            raise FrameError(f"{len(self.buf) - self.pos} bytes left over after the last field")


def text(value: str) -> bytes:
    data = value.encode("utf-8")
    if len(data) > 0xFFFF:
        raise ValueError(f"a string field holds at most 65535 bytes, not {len(data)}")
    return _U16.pack(len(data)) + data


def blob(value: bytes) -> bytes:
    return _U32.pack(len(value)) + value


# --- HELLO -------------------------------------------------------------------------------
class Hello(NamedTuple):
    version: int
    token: str
    session: str
    scope: str


def encode_hello(token: str, session: str = "", scope: str = "") -> bytes:
    return _U16.pack(VERSION) + text(token) + text(session) + text(scope)


def decode_hello(body: bytes | memoryview) -> Hello:
    r = Reader(body)
    hello = Hello(r.u16(), r.text(), r.text(), r.text())
    r.end()
    return hello


class Welcome(NamedTuple):
    """HELLO's answer."""

    version: int
    daemon_pid: int
    peer_pid: int
    max_frame: int
    segment_threshold: int
    instance_id: str
    shm_directory: str


def encode_welcome(welcome: Welcome) -> bytes:
    return (
        _HELLO_ANSWER.pack(*welcome[:5]) + text(welcome.instance_id) + text(welcome.shm_directory)
    )


def decode_welcome(body: bytes | memoryview) -> Welcome:
    r = Reader(body)
    version, daemon_pid, peer_pid, max_frame, threshold = r.struct(_HELLO_ANSWER)
    welcome = Welcome(version, daemon_pid, peer_pid, max_frame, threshold, r.text(), r.text())
    r.end()
    return welcome


# --- PUT ---------------------------------------------------------------------------------
class Put(NamedTuple):
    key: str
    metadata: bytes
    source: int
    crc: int | None
    size: int
    #: SOURCE_INLINE: the value; SOURCE_SHM_FILE: the file's name; else empty.
    data: bytes | memoryview
    file_name: str


def encode_put_head(
    key: str, metadata: bytes, source: int, size: int, crc: int | None = None
) -> bytes:
    """A PUT body up to its value (inline) or file name (SOURCE_SHM_FILE)."""
    return text(key) + blob(metadata) + _PUT_TAIL.pack(source, crc is not None, crc or 0, size)


def decode_put(body: bytes | memoryview) -> Put:
    r = Reader(body)
    key, metadata = r.text(), r.blob()
    source, has_crc, crc, size = r.struct(_PUT_TAIL)
    data: bytes | memoryview = b""
    name = ""
    if source == SOURCE_INLINE:
        data = r.rest()
        if len(data) != size:
            raise FrameError(f"Put of {key!r} declares {size} bytes and carries {len(data)}")
    elif source == SOURCE_SHM_FILE:
        name = r.text()
    elif source != SOURCE_MEMFD:
        raise FrameError(f"Put of {key!r}: unknown value source {source}; use 0, 1 or 2")
    r.end()
    return Put(key, metadata, source, crc if has_crc else None, size, data, name)


def encode_put_answer(location: str, size: int) -> bytes:
    return _PUT_ANSWER.pack(LOCATION_NUMBERS[location], size)


def decode_put_answer(body: bytes | memoryview) -> tuple[str, int]:
    location, size = _PUT_ANSWER.unpack_from(body)
    return LOCATIONS.get(location, "unspecified"), int(size)


# --- GET ---------------------------------------------------------------------------------
def encode_get(key: str, accept: int) -> bytes:
    return text(key) + _U8.pack(accept)


def decode_get(body: bytes | memoryview) -> tuple[str, int]:
    r = Reader(body)
    key, accept = r.text(), r.u8()
    r.end()
    return key, accept


class GetAnswer(NamedTuple):
    location: str
    metadata: bytes
    size: int
    crc: int
    #: SOURCE_INLINE (``data`` is the value) or SOURCE_MEMFD (a memfd came with it).
    form: int
    data: bytes | memoryview


def encode_get_answer_head(location: str, metadata: bytes, size: int, crc: int, form: int) -> bytes:
    return _U8.pack(LOCATION_NUMBERS[location]) + blob(metadata) + _GET_HEAD.pack(size, crc, form)


def decode_get_answer(body: bytes | memoryview) -> GetAnswer:
    r = Reader(body)
    location = r.u8()
    metadata = r.blob()
    size, crc, form = r.struct(_GET_HEAD)
    data = r.rest()
    if form == SOURCE_INLINE and len(data) != size:
        raise FrameError(f"a Get answer declares {size} bytes and carries {len(data)}")
    return GetAnswer(LOCATIONS.get(location, "unspecified"), metadata, size, crc, form, data)


# --- DELETE, STAT --------------------------------------------------------------------------
def encode_keys(keys: Sequence[str]) -> bytes:
    return _U32.pack(len(keys)) + b"".join(text(key) for key in keys)


def decode_keys(body: bytes | memoryview) -> list[str]:
    r = Reader(body)
    count = r.u32()
    if count > len(body) // 2:  # every key takes at least its 2-byte length
        raise FrameError(f"{count} keys cannot fit in a body of {len(body)} bytes")
    keys = [r.text() for _ in range(count)]
    r.end()
    return keys


def encode_count(count: int) -> bytes:
    return _U32.pack(count)


def decode_count(body: bytes | memoryview) -> int:
    return int(_U32.unpack_from(body)[0])


def encode_key(key: str) -> bytes:
    return text(key)


def decode_key(body: bytes | memoryview) -> str:
    r = Reader(body)
    key = r.text()
    r.end()
    return key


def encode_stat_answer(size: int, location: str, metadata_size: int) -> bytes:
    return _STAT.pack(size, LOCATION_NUMBERS[location], metadata_size)


def decode_stat_answer(body: bytes | memoryview) -> tuple[int, str, int]:
    size, location, metadata_size = _STAT.unpack_from(body)
    return int(size), LOCATIONS.get(location, "unspecified"), int(metadata_size)


# --- PUT_MANY -----------------------------------------------------------------------------
class PutItem(NamedTuple):
    key: str
    metadata: bytes
    crc: int | None
    data: bytes


def encode_put_item(key: str, data: bytes, metadata: bytes, crc: int | None) -> bytes:
    return (
        text(key)
        + blob(metadata)
        + _ITEM_HEAD.pack(crc is not None, crc or 0)
        + _U32.pack(len(data))
        + data
    )


def decode_put_many(body: bytes | memoryview) -> list[PutItem]:
    r = Reader(body)
    count = r.u32()
    if count > len(body) // 11:  # the smallest item: 2 + 4 + 5 + 4 bytes, minus the key
        raise FrameError(f"{count} items cannot fit in a body of {len(body)} bytes")
    items = []
    for _ in range(count):
        key, metadata = r.text(), r.blob()
        has_crc, crc = r.struct(_ITEM_HEAD)
        items.append(PutItem(key, metadata, crc if has_crc else None, r.blob()))
    r.end()
    return items


def encode_locations(locations: Sequence[str]) -> bytes:
    return _U32.pack(len(locations)) + bytes(LOCATION_NUMBERS[x] for x in locations)


def decode_locations(body: bytes | memoryview) -> list[str]:
    r = Reader(body)
    count = r.u32()
    return [LOCATIONS.get(b, "unspecified") for b in bytes(r.raw(count))]


# --- GET_MANY ------------------------------------------------------------------------------
def encode_value_item(location: str, crc: int, metadata: bytes, data: Buffer) -> bytes:
    return b"".join(
        (
            _VALUE_ITEM.pack(ITEM_VALUE, LOCATION_NUMBERS[location], crc),
            blob(metadata),
            _U32.pack(len(data)),
            data,
        )
    )


def encode_large_item(location: str, size: int) -> bytes:
    return _LARGE_ITEM.pack(ITEM_TOO_LARGE, LOCATION_NUMBERS[location], size)


def encode_failed_item(code: int, message: str) -> bytes:
    return _U8.pack(ITEM_FAILED) + _U8.pack(code) + text(message[:2000])


MISSING_ITEM = _U8.pack(ITEM_MISSING)


class GetItem(NamedTuple):
    state: int
    location: str = ""
    crc: int = 0
    metadata: bytes = b""
    data: bytes = b""
    size: int = 0
    code: int = 0
    message: str = ""


def decode_get_many_answer(body: bytes | memoryview) -> list[GetItem]:
    r = Reader(body)
    items = []
    for _ in range(r.u32()):
        state = r.u8()
        if state == ITEM_MISSING:
            items.append(GetItem(state))
        elif state == ITEM_VALUE:
            location, crc = r.u8(), r.u32()
            metadata = r.blob()
            data = r.blob()
            items.append(
                GetItem(state, LOCATIONS.get(location, ""), crc, metadata, data, len(data))
            )
        elif state == ITEM_TOO_LARGE:
            location, size = r.u8(), r.u64()
            items.append(GetItem(state, LOCATIONS.get(location, ""), size=size))
        elif state == ITEM_FAILED:
            code = r.u8()
            items.append(GetItem(state, code=code, message=r.text()))
        else:
            raise FrameError(f"unknown GetMany item state {state}")
    return items
