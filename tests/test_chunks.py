"""Large values on the wire and on disk: chunk messages built and read without
protobuf, values assembled in one buffer, page-aligned spill files.

Each encoding is checked against protobuf's own, and sizes around every boundary
(0 and 1 byte, a chunk and one byte either side, several store-thread hops' worth)
go through a real daemon both ways, in RAM and streamed to and from disk.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from memctl import AsyncClient, Client
from memctl._base import GetAssembler, get_message
from memctl.chunks import chunk_payload, encode_chunk, unfilled_bytes
from memctl.errors import DataLoss, MemctlError
from memctl.protocol import CHUNK_SIZE
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.core import CHUNKS_PER_HOP
from memctl_server.spillfile import (
    ALIGN_FROM,
    PAGE,
    READ_SIZE,
    Compression,
    SpillFileDamaged,
    SpillReader,
    SpillWriter,
    checksum,
    header_length,
    read_record,
    scan_header,
)
from tests.conftest import Daemon, wait_until
from tests.test_bad_input import assert_status, put_stream, rpc_error
from tests.tokens import raw_channel

MiB = 1 << 20
#: Around every boundary a value meets on its way.
SIZES = [
    0,
    1,
    CHUNK_SIZE - 1,
    CHUNK_SIZE,
    CHUNK_SIZE + 1,
    CHUNKS_PER_HOP * CHUNK_SIZE,
    (2 * CHUNKS_PER_HOP + 1) * CHUNK_SIZE + 7,
]


def value_for(size: int, seed: int = 0) -> bytes:
    return random.Random(seed + size).randbytes(size)


def varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes([*out, value])


# --- chunk messages ------------------------------------------------------------------
@pytest.mark.parametrize("size", [*SIZES[:5], 127, 128, 16383, 16384])
def test_chunk_messages_are_what_protobuf_makes_and_reads(size: int) -> None:
    data = value_for(size)
    encoded = encode_chunk(memoryview(data))
    assert encoded == pb.PutRequest(chunk=data).SerializeToString()
    assert encoded == pb.GetResponse(chunk=data).SerializeToString()
    payload = chunk_payload(encoded)
    assert isinstance(payload, memoryview) and payload == data
    assert payload.obj is encoded  # a view of the bytes received, not a copy


@pytest.mark.parametrize(
    "message",
    [
        b"",
        pb.PutRequest(header=pb.PutHeader(key="k", size=3)).SerializeToString(),
        pb.GetResponse(header=pb.GetHeader(key="k", size=3)).SerializeToString(),
        encode_chunk(memoryview(b"abc")) + b"\x18\x01",  # and a field protobuf skips
        encode_chunk(memoryview(b"abc"))[:-1],  # shorter than it says
        b"\x12" + b"\xff" * 11,  # a varint longer than any
        b"\x12\x80",  # a varint cut off
    ],
)
def test_any_other_message_is_left_to_protobuf(message: bytes) -> None:
    assert chunk_payload(message) is None


def chunk_like() -> st.SearchStrategy[bytes]:
    """Bytes near a chunk message: right or wrong lengths, other fields around."""
    return st.builds(
        lambda data, delta, before, after: (
            before + b"\x12" + varint(len(data) + delta) + data + after
        ),
        st.binary(max_size=300),
        st.integers(min_value=0, max_value=3),
        st.sampled_from([b"", b"\x0a\x00", b"\x12\x01x"]),
        st.sampled_from([b"", b"\x18\x01", b"\x12\x00"]),
    )


@given(st.one_of(st.binary(max_size=64), chunk_like()))
def test_a_payload_is_found_only_where_protobuf_finds_that_chunk_alone(raw: bytes) -> None:
    payload = chunk_payload(raw)
    if payload is None:
        return
    message = pb.PutRequest.FromString(raw)
    assert message.WhichOneof("kind") == "chunk"
    assert message.chunk == payload


# --- assembling a value --------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, PAGE, CHUNK_SIZE + 1])
def test_unfilled_bytes_become_the_bytes_written(size: int) -> None:
    data = value_for(size)
    value, view = unfilled_bytes(size)
    view[:] = data
    view.release()
    assert type(value) is bytes and value == data and hash(value) == hash(data)


def header(size: int, crc: int) -> pb.GetResponse:
    return pb.GetResponse(header=pb.GetHeader(key="k", size=size, crc32c=crc))


@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE - 1, 3 * CHUNK_SIZE + 1])
def test_get_assembler_fills_one_buffer_from_chunks_of_any_size(size: int) -> None:
    data = value_for(size)
    assembler = GetAssembler("k")
    assembler.feed(header(size, checksum(data)))
    cuts = sorted({0, size, *random.Random(size).sample(range(size + 1), min(size, 5))})
    for start, end in itertools.pairwise(cuts):
        message = get_message(encode_chunk(memoryview(data)[start:end]))
        assert isinstance(message, memoryview)
        assembler.feed(message)
    value = assembler.result()
    assert type(value.data) is bytes and value.data == data


def test_get_assembler_refuses_more_than_declared_or_chunks_before_the_header() -> None:
    assembler = GetAssembler("k")
    assembler.feed(header(3, checksum(b"abc")))
    assembler.feed(memoryview(b"ab"))
    with pytest.raises(MemctlError, match="more than the service declared"):
        assembler.feed(memoryview(b"cd"))
    with pytest.raises(MemctlError, match="no header"):
        GetAssembler("k").feed(memoryview(b"a"))
    damaged = GetAssembler("k")
    damaged.feed(get_message(header(3, 0).SerializeToString()))
    damaged.feed(get_message(encode_chunk(memoryview(b"abc"))))
    with pytest.raises(DataLoss):
        damaged.result()


# --- spill files ---------------------------------------------------------------------
def write_file(
    directory: Path, pieces: list[bytes], compression: Compression = "none"
) -> SpillWriter:
    writer = SpillWriter(
        str(directory), "v", scope="s", key="k", metadata=b"m", compression=compression
    )
    for piece in pieces:
        writer.write(piece)
    writer.commit()
    return writer


def read_in_pieces(path: str, crc: int) -> bytes:
    reader = SpillReader(path, "k", crc)
    try:
        return b"".join(iter(reader.read, b""))
    finally:
        reader.close()


def test_a_large_body_starts_on_a_page_and_reads_back(tmp_path: Path) -> None:
    data = value_for(3 * ALIGN_FROM + 5)
    writer = write_file(tmp_path, [data[:ALIGN_FROM], data[ALIGN_FROM:]])
    found = scan_header(writer.path)
    assert found.aligned and found.length % PAGE == 0
    assert found.length == header_length("s", "k", b"m", len(data))
    assert os.path.getsize(writer.path) == found.length + len(data)
    assert read_record(writer.path, "k", checksum(data)).data == data
    assert read_in_pieces(writer.path, checksum(data)) == data


def test_a_body_after_a_small_first_piece_follows_its_header(tmp_path: Path) -> None:
    """As every file did before bodies were aligned: such files still read."""
    data = value_for(ALIGN_FROM + 1)
    writer = write_file(tmp_path, [data[:100], data[100:]])
    found = scan_header(writer.path)
    assert not found.aligned and found.length == header_length("s", "k", b"m")
    assert read_record(writer.path, "k", checksum(data)).data == data


def test_a_file_cut_inside_its_padding_is_damaged(tmp_path: Path) -> None:
    writer = write_file(tmp_path, [value_for(ALIGN_FROM)])
    os.truncate(writer.path, header_length("s", "k", b"m") + 1)
    with pytest.raises(SpillFileDamaged, match="truncated"):
        scan_header(writer.path)


@pytest.mark.parametrize("compression", ["none", "lz4", "zlib"])
@pytest.mark.parametrize("size", [0, 1, READ_SIZE - 1, READ_SIZE, READ_SIZE + 1, 3 * READ_SIZE + 5])
def test_read_back_whole_or_in_pieces_is_the_value(
    tmp_path: Path, compression: Compression, size: int
) -> None:
    data = bytes(size // 2) + value_for(size - size // 2)  # half of it compresses
    writer = write_file(tmp_path, [data], compression)
    record = read_record(writer.path, "k", checksum(data))
    assert type(record.data) is bytes and record.data == data and record.crc == checksum(data)
    assert read_in_pieces(writer.path, checksum(data)) == data


@pytest.mark.parametrize("change", ["longer", "shorter", "flipped"])
def test_read_back_whole_finds_a_file_changed_behind_its_back(tmp_path: Path, change: str) -> None:
    data = value_for(2 * READ_SIZE + 3)
    writer = write_file(tmp_path, [data])
    size = os.path.getsize(writer.path)
    with open(writer.path, "r+b") as fh:
        if change == "longer":
            fh.seek(size)
            fh.write(b"x")
        elif change == "shorter":
            fh.truncate(size - 1)
        else:
            fh.seek(size - READ_SIZE)
            fh.write(bytes([fh.read(1)[0] ^ 1]))
    with pytest.raises(SpillFileDamaged):
        read_record(writer.path, "k", checksum(data))


def test_a_value_spilled_from_ram_keeps_the_checksum_it_arrived_with(tmp_path: Path) -> None:
    """Not the checksum of its bytes now: damage suffered in RAM shows on reading back."""
    arrived, now = b"value as it arrived", b"value as RAM has it"
    writer = SpillWriter(
        str(tmp_path),
        "v",
        scope="s",
        key="k",
        metadata=b"",
        compression="none",
        crc=checksum(arrived),
    )
    writer.write(now)
    found, _ = writer.commit()
    assert found.crc == checksum(arrived)
    with pytest.raises(SpillFileDamaged, match="checksum"):
        read_record(writer.path, "k", found.crc)


# --- through a daemon ----------------------------------------------------------------
@pytest.fixture
def on_disk(spawn: Callable[..., Daemon]) -> Daemon:
    """A daemon whose target share (0.6 of 4 MiB) sends values over 2.4 MiB to disk."""
    return spawn("--memory-limit", "4MiB")


def where(size: int) -> str:
    return "disk" if size > 0.6 * 4 * MiB else "memory"


def test_every_size_round_trips_in_ram_and_on_disk(daemon: Daemon, on_disk: Daemon) -> None:
    for server in (daemon, on_disk):
        with Client(server.address) as client:
            for size in SIZES:
                data = value_for(size)
                result = client.put(f"k{size}", data, metadata=b"meta")
                expected = "memory" if server is daemon else where(size)
                assert result.size == size and result.location == expected
            for size in SIZES:
                value = client.get_value(f"k{size}")
                assert value.data == value_for(size) and value.metadata == b"meta"


def test_the_async_client_round_trips_every_size(on_disk: Daemon) -> None:
    async def scenario() -> None:
        async with AsyncClient(on_disk.address) as client:
            for size in SIZES:
                await client.put(f"k{size}", value_for(size, 1))
            for size in SIZES:
                assert await client.get(f"k{size}") == value_for(size, 1)

    asyncio.run(scenario())


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    return (data[start : start + size] for start in range(0, len(data), size))


def test_chunks_of_any_size_and_encoding_are_taken(on_disk: Daemon) -> None:
    """Another client's chunks: not our size, and some encoded as protobuf may
    (an unknown field after the payload) but not as ``memctl.chunks`` builds them."""
    data = value_for(5 * MiB + 3)
    with raw_channel(on_disk.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        stub.Put(put_stream("odd", len(data), *chunked(data, 700_001)), timeout=30)
        header = pb.PutRequest(header=pb.PutHeader(key="unusual", size=len(data)))
        messages = [header.SerializeToString()]
        messages += [encode_chunk(memoryview(c)) + b"\x18\x01" for c in chunked(data, MiB)]
        channel.stream_unary("/memctl.v1.MemctlService/Put")(iter(messages), timeout=30)
    with Client(on_disk.address) as client:
        assert client.get("odd") == data
        assert client.get("unusual") == data


def test_a_put_to_disk_cut_short_leaves_the_old_value_and_no_file(on_disk: Daemon) -> None:
    old, new = value_for(9 * MiB, 2), value_for(9 * MiB, 3)
    with Client(on_disk.address) as client:
        assert client.put("k", old).location == "disk"
    with raw_channel(on_disk.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        short = put_stream("k", len(new), *chunked(new[: 6 * MiB + 1], MiB))
        error = rpc_error(lambda: stub.Put(short, timeout=30))
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "ended after", "Nothing")
        long = put_stream("k", len(new), *chunked(new + b"x", MiB))
        error = rpc_error(lambda: stub.Put(long, timeout=30))
        assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "exceed the declared size")
    with Client(on_disk.address) as client:
        assert client.get("k") == old
    spill = on_disk.local_directory
    wait_until(lambda: not list(spill.rglob("*.tmp")))  # the aborted files, removed
    assert len(list(spill.rglob("*.spill"))) == 1
