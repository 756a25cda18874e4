"""No value is ever returned wrong: spill files damaged on a real disk give DATA_LOSS.

Each test starts a real daemon, pushes values to disk, damages their spill files
with ordinary file operations (flip bytes, truncate, delete, overwrite the header,
garble a compressed frame) and reads them back through the real client and the raw
stub. The damaged value is reported and dropped; every other value reads back
byte-identical; the daemon keeps serving and logs no traceback.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from memctl import Client
from memctl.errors import DataLoss, MemctlError
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.spillfile import HEADER_SIZE, SpillFileDamaged, scan_header
from tests.conftest import DATA_PLANE, Daemon
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

MiB = 1 << 20


def compressible(seed: int, size: int) -> bytes:
    """Data lz4 and zlib shrink (so their frames are what is on disk), yet unique."""
    rng = random.Random(seed)
    words = [rng.randbytes(8) for _ in range(64)]
    return b"".join(rng.choice(words) for _ in range(size // 8))


def spill_file(daemon: Daemon, key: str) -> Path:
    """The spill file that holds ``key``, found by reading the files' headers."""
    for path in daemon.local_directory.glob("memctl-*/*/*.spill"):
        try:
            if scan_header(str(path)).key == key:
                return path
        except SpillFileDamaged:
            continue
    raise AssertionError(f"no spill file holds {key!r}")


def flip_bytes(path: Path) -> None:
    size = path.stat().st_size
    with path.open("r+b") as fh:
        fh.seek(size // 2)
        chunk = fh.read(16)
        fh.seek(size // 2)
        fh.write(bytes(b ^ 0xFF for b in chunk))


def truncate_half(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def delete(path: Path) -> None:
    path.unlink()


def garble_header(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.write(os.urandom(HEADER_SIZE))


def garble_body_start(path: Path) -> None:
    """Overwrite the first bytes after the header: an lz4/zlib frame's own header."""
    key_end = scan_header(str(path)).length
    with path.open("r+b") as fh:
        fh.seek(key_end)
        fh.write(b"\xde\xad\xbe\xef" * 4)


DAMAGE: dict[str, Callable[[Path], None]] = {
    "flipped": flip_bytes,
    "truncated": truncate_half,
    "deleted": delete,
    "header": garble_header,
    "frame": garble_body_start,
}


@pytest.fixture(params=["none", "lz4", "zlib"])
def compression(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def assert_lost(client: Client, daemon: Daemon, key: str, others: dict[str, bytes]) -> None:
    with pytest.raises(DataLoss) as info:
        client.get(key)
    message = str(info.value)
    assert repr(key) in message and "put it again" in message and "\n" not in message
    with pytest.raises(KeyError):  # dropped, so the next read is a plain miss
        client.get(key)
    for other, value in others.items():
        assert client.get(other) == value, f"{other} damaged too"
    losses = [e for e in client.events() if e.kind == "data_loss"]
    assert losses and repr(key) in losses[-1].reason
    assert "Traceback" not in daemon.log()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_spilled_value_is_data_loss_and_dropped(
    spawn: Callable[..., Daemon], compression: str, damage: str
) -> None:
    """Values spilled from RAM (read back whole)."""
    daemon = spawn("--memory-limit", "1GiB", "--set", f"memory.spill-compression={compression}")
    values = {f"value-{i}": compressible(i, 256 * 1024) for i in range(4)}
    with Client(daemon.address) as client:
        for key, value in values.items():
            client.put(key, value)
        client.evict()
        assert client.status().service.keys_on_disk == 4
        DAMAGE[damage](spill_file(daemon, "value-0"))
        others = {k: v for k, v in values.items() if k != "value-0"}
        assert_lost(client, daemon, "value-0", others)
        assert client.status().service.keys_on_disk + client.status().service.keys_in_memory == 3


@pytest.mark.parametrize("damage", ["flipped", "truncated", "deleted"])
def test_a_damaged_large_value_is_never_sent_whole(
    spawn: Callable[..., Daemon], compression: str, damage: str
) -> None:
    """A value larger than the target share is streamed to and from disk; damage found
    while streaming it back ends the Get with DATA_LOSS before its last chunk."""
    daemon = spawn("--memory-limit", "16MiB", "--set", f"memory.spill-compression={compression}")
    large = compressible(7, 24 * MiB)
    small = compressible(8, 100_000)
    with Client(daemon.address) as client:
        assert client.put("large", large).location == "disk"
        client.put("small", small)
        DAMAGE[damage](spill_file(daemon, "large"))
        with raw_channel(daemon.address) as channel:
            stub = pb_grpc.MemctlServiceStub(channel)
            received = 0
            with pytest.raises(grpc.RpcError) as info:
                for message in stub.Get(pb.GetRequest(key="large"), timeout=30):
                    received += len(message.chunk)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS, info.value.details()
        assert received < len(large)
        with pytest.raises(KeyError):
            client.get("large")
        assert client.get("small") == small
        assert "Traceback" not in daemon.log()


def test_get_header_carries_the_checksum_and_large_values_round_trip(
    spawn: Callable[..., Daemon],
) -> None:
    import crc32c

    daemon = spawn("--memory-limit", "16MiB")
    value = random.Random(3).randbytes(40 * MiB)
    with Client(daemon.address) as client:
        assert client.put("big", value, metadata=b"m").location == "disk"
        assert client.get_value("big").data == value
        with raw_channel(daemon.address) as channel:
            stub = pb_grpc.MemctlServiceStub(channel)
            header = next(iter(stub.Get(pb.GetRequest(key="big"), timeout=30))).header
        assert header.crc32c == crc32c.crc32c(value)
        assert header.size == len(value) and header.metadata == b"m"


def test_a_put_whose_checksum_does_not_match_stores_nothing(daemon: Daemon) -> None:
    def stream(crc: int) -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(key="k", size=3, crc32c=crc))
        yield pb.PutRequest(chunk=b"abc")

    with raw_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            stub.Put(stream(12345), timeout=10)
        assert info.value.code() == grpc.StatusCode.DATA_LOSS
        assert "damaged on the way" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as missing:
            next(iter(stub.Get(pb.GetRequest(key="k"), timeout=10)))
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_the_client_refuses_bytes_that_do_not_match_the_header() -> None:
    """The client's own check (the daemon never sends such a stream, so the messages
    are made here)."""
    from memctl._base import GetAssembler

    assembler = GetAssembler("k")
    assembler.feed(pb.GetResponse(header=pb.GetHeader(key="k", size=3, crc32c=1)))
    assembler.feed(pb.GetResponse(chunk=b"abc"))
    with pytest.raises(DataLoss, match="damaged on the way"):
        assembler.result()
    short = GetAssembler("k")
    short.feed(pb.GetResponse(header=pb.GetHeader(key="k", size=4)))
    short.feed(pb.GetResponse(chunk=b"abc"))
    with pytest.raises(MemctlError, match="ended early"):
        short.result()
