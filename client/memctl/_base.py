"""What ``Client`` and ``AsyncClient`` share: addresses, deadlines, request building
and response decoding. The two clients differ only in how they wait, so a fix here
lands in both.
"""

from __future__ import annotations

import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import crc32c
import grpc

from . import chunks
from .auth import AUTHORIZATION_METADATA_KEY, CLIENT_METADATA_KEY, SCOPE_METADATA_KEY, TokenSource
from .errors import (
    DataLoss,
    FailedPrecondition,
    InvalidArgument,
    MemctlError,
    ServiceUnavailable,
    from_failure,
    translate,
)
from .protocol import (
    CHUNK_SIZE,
    MAX_INLINE_VALUE,
    MESSAGE_BUDGET,
    SESSION_METADATA_KEY,
    key_problem,
    metadata_problem,
)
from .results import EvictResult, PutResult, StoredValue, TrimResult, location_name
from .samehost import SameHostConnection
from .v1 import memctl_pb2 as pb

DEFAULT_ADDRESS = "127.0.0.1:7075"
#: Seconds a call may take, unless the client was given another timeout.
DEFAULT_TIMEOUT = 60.0

CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.max_receive_message_length", 8 * CHUNK_SIZE),
    # Reconnect promptly after a daemon restart (gRPC's default backoff grows to 120 s).
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

Buffer = bytes | bytearray | memoryview


def resolve_address(address: str | None) -> str:
    """The address given, else ``MEMCTL_ADDRESS``, else the default loopback port."""
    return address or os.environ.get("MEMCTL_ADDRESS") or DEFAULT_ADDRESS


def check_key(key: str) -> None:
    problem = key_problem(key)
    if problem:
        raise InvalidArgument(problem)


def keys_list(keys: str | Iterable[str]) -> list[str]:
    """One key or many, checked."""
    result = [keys] if isinstance(keys, str) else list(keys)
    for key in result:
        check_key(key)
    return result


def put_requests(key: str, data: Buffer, metadata: bytes) -> Iterator[bytes]:
    """The Put stream, encoded for ``put_call``: the header, then chunks made as sent.
    Checks the input now, before any call is made."""
    check_key(key)
    problem = metadata_problem(metadata)
    if problem:
        raise InvalidArgument(problem)
    return _put_stream(key, memoryview(data).cast("B"), metadata)


def _put_stream(key: str, view: memoryview, metadata: bytes) -> Iterator[bytes]:
    # The checksum lets the service refuse a value damaged on the way (DATA_LOSS). The
    # header carries it, so it takes a pass of its own before the first chunk.
    crc = crc32c.crc32c(view)
    header = pb.PutHeader(key=key, size=view.nbytes, metadata=metadata, crc32c=crc)
    yield pb.PutRequest(header=header).SerializeToString()
    for start in range(0, view.nbytes, CHUNK_SIZE):
        yield chunks.encode_chunk(view[start : start + CHUNK_SIZE])


_SERVICE = "/" + pb.DESCRIPTOR.services_by_name["MemctlService"].full_name


def put_call(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """Put on ``channel``, sending ``put_requests``' encoded messages as they are
    (the generated stub would want messages to serialize)."""
    return channel.stream_unary(f"{_SERVICE}/Put", response_deserializer=pb.PutResponse.FromString)


def pipeline_call(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """Pipeline on ``channel``, sending requests as ``memctl.pipeline`` encodes them."""
    return channel.stream_stream(
        f"{_SERVICE}/Pipeline", response_deserializer=pb.PipelineResponse.FromString
    )


def get_call(channel: grpc.Channel | grpc.aio.Channel) -> Any:
    """Get on ``channel``, its chunks decoded by ``get_message``."""
    return channel.unary_stream(
        f"{_SERVICE}/Get",
        request_serializer=pb.GetRequest.SerializeToString,
        response_deserializer=get_message,
    )


def is_inline(data: Buffer) -> bool:
    """Whether a value travels whole in one message (else it is streamed in chunks)."""
    return memoryview(data).nbytes <= MAX_INLINE_VALUE


#: The most bytes protobuf adds to a PutMany item around its key, data and metadata:
#: the item's own tag and length, each field's tag and length, the CRC as a varint.
ITEM_FRAMING = 40


class PutEntry(NamedTuple):
    """One value of a PutMany, checked, with its CRC32C and the most bytes it takes
    in a message (``encoded_size``: batches are split by it)."""

    key: str
    data: bytes
    metadata: bytes
    crc: int
    encoded_size: int


def put_entry(key: str, data: Buffer, metadata: bytes) -> PutEntry:
    check_key(key)
    problem = metadata_problem(metadata)
    if problem:
        raise InvalidArgument(problem)
    value = data if isinstance(data, bytes) else memoryview(data).cast("B").tobytes()
    size = len(key.encode()) + len(value) + len(metadata) + ITEM_FRAMING
    return PutEntry(key, value, metadata, crc32c.crc32c(value), size)


def put_operation(entries: Iterable[PutEntry]) -> pb.Operation:
    """A PutMany operation, its items built in place (no copy of the message)."""
    operation = pb.Operation()
    add = operation.put_many.items.add
    for key, data, metadata, crc, _ in entries:
        add(key=key, data=data, metadata=metadata, crc32c=crc)
    return operation


def get_operation(keys: list[str]) -> pb.Operation:
    return pb.Operation(get_many=pb.GetManyRequest(keys=keys))


def batches_of(entries: list[tuple[int, PutEntry]]) -> Iterator[list[tuple[int, PutEntry]]]:
    """Numbered ``entries`` in groups of at most MESSAGE_BUDGET encoded bytes (keys,
    values and metadata: one message each)."""
    batch: list[tuple[int, PutEntry]] = []
    size = 0
    for numbered in entries:
        entry_size = numbered[1].encoded_size
        if batch and size + entry_size > MESSAGE_BUDGET:
            yield batch
            batch, size = [], 0
        batch.append(numbered)
        size += entry_size
    if batch:
        yield batch


def key_batches(keys: list[str], per_batch: int = 1000) -> Iterator[list[str]]:
    """``keys`` in groups that fit one message (at most ``per_batch`` keys, and
    MESSAGE_BUDGET / 4 bytes of UTF-8, so that an answer carrying them again beside
    MESSAGE_BUDGET of values stays under 4 MiB); one empty group for no keys, so
    that the service says what is wrong with that."""
    batch: list[str] = []
    size = 0
    for key in keys:
        key_size = len(key.encode())
        if batch and (len(batch) == per_batch or size + key_size > MESSAGE_BUDGET // 4):
            yield batch
            batch, size = [], 0
        batch.append(key)
        size += key_size
    yield batch


class PutPlan:
    """What ``put_many`` sends, shared by both clients: its small values in messages
    (``operations``), the rest streamed; the results in the order given."""

    def __init__(self, items: Mapping[str, Buffer] | Iterable[tuple[str, Buffer]], metadata: bytes):
        self.pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
        small = [
            (i, put_entry(k, v, metadata)) for i, (k, v) in enumerate(self.pairs) if is_inline(v)
        ]
        self._batches = list(batches_of(small))
        self._results: dict[int, PutResult] = {}

    def operations(self) -> list[tuple[pb.Operation, str]]:
        """One PutMany operation per message, with a key to name in an error."""
        return [
            (put_operation(entry for _, entry in batch), batch[0][1].key) for batch in self._batches
        ]

    def answered(self, answers: Iterable[pb.OperationResult]) -> list[tuple[int, str, Buffer]]:
        """Take the operations' answers, in order; the values left to stream (index,
        key, data)."""
        for batch, answer in zip(self._batches, answers, strict=True):
            for (index, _), response in zip(batch, answer.put_many.results, strict=True):
                self._results[index] = put_result(response)
        return [(i, k, v) for i, (k, v) in enumerate(self.pairs) if i not in self._results]

    def streamed(self, index: int, result: PutResult) -> None:
        self._results[index] = result

    def results(self) -> list[PutResult]:
        return [self._results[index] for index in range(len(self.pairs))]


def take_values(items: Iterable[pb.GetItem], values: dict[str, bytes], address: str) -> list[str]:
    """Add GetMany items' checked values to ``values``; the keys to read with Get."""
    streamed = []
    for item in items:
        data = checked_data(item, address)
        if data is not None:
            values[item.key] = data
        elif item.streamed:
            streamed.append(item.key)
    return streamed


def stored_value(item: pb.GetItem, address: str) -> StoredValue | None:
    """A GetMany item as a value; None if it is not there. The caller reads a
    ``streamed`` item with Get."""
    data = checked_data(item, address)
    if data is None:
        return None
    return StoredValue(data, item.metadata, location_name(item.location))


def checked_data(item: pb.GetItem, address: str) -> bytes | None:
    """A GetMany item's bytes, checked against its CRC32C; None if it is not there
    (missing, or ``streamed``: the caller reads those with Get)."""
    if not item.found:
        if item.HasField("failure"):
            raise from_failure(item.failure.code, item.failure.message, address, item.key)
        return None
    if item.streamed:
        return None
    data = item.data
    crc = crc32c.crc32c(data)
    if crc != item.crc32c:
        raise DataLoss(
            f"Get of {item.key!r}: the bytes received have CRC32C {crc:#010x}, the "
            f"service sent {item.crc32c:#010x}; they were damaged on the way, read the "
            "value again"
        )
    return data


def put_result(response: pb.PutResponse) -> PutResult:
    return PutResult(response.key, response.size, location_name(response.location))


def get_message(raw: bytes) -> pb.GetResponse | memoryview:
    """``get_call``'s response deserializer: a chunk's payload as a view of the bytes
    received, anything else as a message."""
    payload = chunks.chunk_payload(raw)
    return pb.GetResponse.FromString(raw) if payload is None else payload


class GetAssembler:
    """Collects a Get stream into a value, checking it is whole: each chunk is written
    into one buffer of the size the header declared, and checksummed as it passes."""

    def __init__(self, key: str):
        self.key = key
        self.header: pb.GetHeader | None = None
        self.received = 0
        self._crc = 0
        self._value = b""
        self._view = memoryview(b"")

    def feed(self, message: pb.GetResponse | memoryview) -> None:
        if isinstance(message, memoryview):
            self._add(message)
        elif message.WhichOneof("kind") == "header":
            self.header = message.header
            self._value, self._view = chunks.unfilled_bytes(self.header.size)
        else:
            self._add(memoryview(message.chunk))

    def _add(self, chunk: memoryview) -> None:
        end = self.received + chunk.nbytes
        if self.header is None or end > self.header.size:
            expected = "no header" if self.header is None else f"{self.header.size} bytes"
            raise MemctlError(
                f"Get of {self.key!r} sent more than the service declared ({expected})"
            )
        self._view[self.received : end] = chunk
        self._crc = crc32c.crc32c(chunk, self._crc)
        self.received = end

    def result(self) -> StoredValue:
        """The value, only if it is whole and matches the checksum the service sent."""
        if self.header is None or self.received != self.header.size:
            expected = "?" if self.header is None else self.header.size
            raise MemctlError(
                f"Get of {self.key!r} ended early ({self.received} of {expected} bytes)"
            )
        self._view.release()
        if self._crc != self.header.crc32c:
            raise DataLoss(
                f"Get of {self.key!r}: the bytes received have CRC32C {self._crc:#010x}, the "
                f"service sent {self.header.crc32c:#010x}; they were damaged on the way, "
                "read the value again"
            )
        return StoredValue(self._value, self.header.metadata, location_name(self.header.location))


def evict_request(keys: str | Iterable[str] | None, nbytes: int | None) -> pb.EvictRequest:
    """Named keys, or ``nbytes`` of LRU values; neither means everything in RAM."""
    if keys is not None and nbytes is not None:
        raise InvalidArgument("evict either keys or nbytes, not both")
    if keys is not None:
        return pb.EvictRequest(keys=keys_list(keys))
    if nbytes is not None:
        if nbytes <= 0:
            raise InvalidArgument(f"nbytes must be positive, not {nbytes}")
        return pb.EvictRequest(nbytes=nbytes)
    return pb.EvictRequest(all=True)


def evict_result(response: pb.EvictResponse) -> EvictResult:
    return EvictResult(response.bytes_moved, response.values_moved, response.error)


def trim_result(response: pb.TrimResponse) -> TrimResult:
    return TrimResult(
        response.supported,
        response.detail,
        response.rss_before,
        response.rss_after,
        response.workers_asked,
    )


@contextmanager
def rpc_errors(address: str, key: str | None = None) -> Iterator[None]:
    """Raise the client's exceptions, not grpc's, for a failed call."""
    try:
        yield
    except grpc.RpcError as exc:
        raise translate(exc, address, key) from None


PathLike = str | Path


def _read_pem(path: PathLike | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None


def channel_credentials(
    tls_ca: PathLike | None, tls_cert: PathLike | None, tls_key: PathLike | None
) -> grpc.ChannelCredentials | None:
    """TLS credentials from the arguments, else ``MEMCTL_TLS_CA``/``_CERT``/``_KEY``;
    None (plaintext) when none of them is set."""
    tls_ca = tls_ca or os.environ.get("MEMCTL_TLS_CA") or None
    tls_cert = tls_cert or os.environ.get("MEMCTL_TLS_CERT") or None
    tls_key = tls_key or os.environ.get("MEMCTL_TLS_KEY") or None
    if tls_ca is None and tls_cert is None and tls_key is None:
        return None
    if (tls_cert is None) != (tls_key is None):
        raise InvalidArgument("a client certificate needs both tls_cert and tls_key")
    return grpc.ssl_channel_credentials(
        root_certificates=_read_pem(tls_ca, "TLS CA file"),
        private_key=_read_pem(tls_key, "TLS key file"),
        certificate_chain=_read_pem(tls_cert, "TLS certificate file"),
    )


Metadata = tuple[tuple[str, str], ...]

#: Environment variable choosing a client's transport when ``transport=`` is not given.
TRANSPORT_VARIABLE = "MEMCTL_TRANSPORT"
#: auto: the same-host channel when the daemon has one this client can reach, else
#: gRPC; grpc: gRPC only; same-host: the channel, or an error saying why not.
TRANSPORTS = ("auto", "grpc", "same-host")


def resolve_transport(transport: str | None) -> str:
    chosen = transport or os.environ.get(TRANSPORT_VARIABLE) or "auto"
    if chosen not in TRANSPORTS:
        raise InvalidArgument(
            f"transport {chosen!r} is not one of {', '.join(TRANSPORTS)}"
            + ("" if transport else f" (from {TRANSPORT_VARIABLE})")
        )
    return chosen


class UseGrpc:
    """What ``over_channel`` gives when the operation is to go over gRPC."""


USE_GRPC = UseGrpc()


def check_value_input(key: str, metadata: bytes) -> None:
    check_key(key)
    problem = metadata_problem(metadata)
    if problem:
        raise InvalidArgument(problem)


class SameHostLink:
    """Finds, opens and keeps a client's same-host connection (``memctl.samehost``).

    The daemon says where its channel is in Status; the connection's HELLO carries
    the client's token and its session or scope, so it is dropped (and opened again
    at the next call) whenever those change.
    """

    def __init__(self, mode: str, address: str):
        self.mode = mode
        self.address = address
        self.connection: SameHostConnection | None = None
        #: Why auto mode settled on gRPC (None: not settled).
        self.unavailable: str | None = None
        self.lock = threading.Lock()

    def current(self) -> SameHostConnection | None:
        """The open connection, if it is still good."""
        connection = self.connection
        if connection is not None and connection.broken is None:
            return connection
        return None

    def open(
        self, info: pb.SameHost | None, metadata: Metadata, timeout: float
    ) -> SameHostConnection | None:
        """Connect to the channel ``info`` describes; None (gRPC from now on) in auto
        mode when there is none or it cannot be reached; an error when forced."""
        try:
            if info is None or not info.socket_path:
                raise FailedPrecondition(
                    f"memctl at {self.address} has no same-host channel (same-host.enabled "
                    "is false, or it is older than this client); use transport='grpc'"
                )
            fields = dict(metadata)
            connection = SameHostConnection(
                info.socket_path,
                token=fields.get(AUTHORIZATION_METADATA_KEY, "").partition(" ")[2],
                session=fields.get(SESSION_METADATA_KEY, ""),
                scope=fields.get(SCOPE_METADATA_KEY, ""),
                instance_id=info.instance_id,
                timeout=timeout,
                address=self.address,
            )
        except (FailedPrecondition, ServiceUnavailable) as exc:
            if self.mode == "same-host":
                raise
            self.unavailable = str(exc)
            return None
        self.connection = connection
        return connection

    def drop(self, broken: SameHostConnection | None = None) -> None:
        """Close the connection (only if it is still ``broken``, when given)."""
        connection = self.connection
        if connection is None or (broken is not None and connection is not broken):
            return
        self.connection = None
        connection.close()


def same_host_of(status: pb.StatusResponse) -> pb.SameHost | None:
    service = status.service
    return service.same_host if service.HasField("same_host") else None


class ClientBase:
    """Settings both clients hold: where the daemon is, how to prove who we are."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        session: str | None = None,
        token: str | None = None,
        token_file: PathLike | None = None,
        scope: str | None = None,
        tls_ca: PathLike | None = None,
        tls_cert: PathLike | None = None,
        tls_key: PathLike | None = None,
        transport: str | None = None,
    ):
        self.address = resolve_address(address)
        self.transport = resolve_transport(transport)
        self._same_host = SameHostLink(self.transport, self.address)
        self.timeout = timeout
        self.credentials = channel_credentials(tls_ca, tls_cert, tls_key)
        try:
            self._token = TokenSource(self.address, token, token_file)
        except (OSError, ValueError) as exc:
            raise InvalidArgument(f"cannot read the memctl token: {exc}") from None
        extra = [(CLIENT_METADATA_KEY, secrets.token_hex(8))]
        if scope:
            extra.append((SCOPE_METADATA_KEY, scope))
        if session:
            extra.append((SESSION_METADATA_KEY, session))
        self._metadata: Metadata = tuple(extra)
        self._open_channel()

    @property
    def metadata(self) -> Metadata:
        """What every call sends: the token, this client's id, its scope or session."""
        return (*self._metadata, *self._token.current())

    @metadata.setter
    def metadata(self, value: Metadata) -> None:
        """Replace the call metadata but the token (which follows its file); the
        same-host connection, whose HELLO carried the old, is dropped."""
        self._metadata = tuple(i for i in value if i[0] != AUTHORIZATION_METADATA_KEY)
        self._same_host.drop()

    def _open_channel(self) -> None:
        """Make the channel and stub (blocking or asyncio)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.address!r})"
