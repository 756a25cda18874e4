"""Bad input gets a clear error, loses nothing, and the daemon keeps serving.

Most cases go through the raw generated stub, not ``memctl.Client``: the client
checks input itself, and the service must hold even against clients that don't.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from memctl import Client
from memctl.errors import ResourceExhausted
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from tests.conftest import Daemon, run_memctl, start_daemon, wait_until
from tests.tokens import raw_channel

MiB = 1 << 20


@pytest.fixture
def stub(daemon: Daemon) -> Iterator[pb_grpc.MemctlServiceStub]:
    with raw_channel(daemon.address) as channel:
        yield pb_grpc.MemctlServiceStub(channel)


def put_stream(key: str, size: int, *chunks: bytes) -> Iterator[pb.PutRequest]:
    yield pb.PutRequest(header=pb.PutHeader(key=key, size=size))
    for chunk in chunks:
        yield pb.PutRequest(chunk=chunk)


def rpc_error(call: Callable[[], object]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, *words: str) -> None:
    assert error.code() == code, error.details()
    details = error.details()
    assert "Traceback" not in details and "\n" not in details
    for word in words:
        assert word in details, details


@pytest.mark.parametrize(
    ("key", "words"),
    [("", ["empty"]), ("k" * 4097, ["4097 bytes", "4096"])],
)
def test_bad_keys_are_invalid_argument(
    stub: pb_grpc.MemctlServiceStub, key: str, words: list[str]
) -> None:
    error = rpc_error(lambda: stub.Put(put_stream(key, 1, b"x"), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, *words)
    error = rpc_error(lambda: next(stub.Get(pb.GetRequest(key=key), timeout=10)))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, *words)
    with Client(stub_address(stub)) as client, pytest.raises(ValueError, match="key"):
        client.put(key, b"x")


def stub_address(stub: pb_grpc.MemctlServiceStub) -> str:
    return stub.address  # type: ignore[attr-defined,no-any-return]


@pytest.fixture(autouse=True)
def _remember_address(request: pytest.FixtureRequest) -> None:
    """Let ``stub_address`` find the daemon of a test that uses ``stub``."""
    if "stub" in request.fixturenames:
        stub = request.getfixturevalue("stub")
        stub.address = request.getfixturevalue("daemon").address


def test_path_like_keys_are_plain_keys(stub: pb_grpc.MemctlServiceStub, daemon: Daemon) -> None:
    for key in ("../../etc/passwd", "a/b\x00c", "/", ".."):
        stub.Put(put_stream(key, 3, b"abc"), timeout=10)
        got = list(stub.Get(pb.GetRequest(key=key), timeout=10))
        assert got[0].header.key == key and got[1].chunk == b"abc"
    assert sorted(p.name for p in daemon.local_directory.iterdir())[0].startswith("memctl-spill-")


def test_put_that_overflows_or_falls_short_stores_nothing(
    stub: pb_grpc.MemctlServiceStub, daemon: Daemon
) -> None:
    with Client(daemon.address) as client:
        client.put("k", b"old value")
    error = rpc_error(lambda: stub.Put(put_stream("k", 4, b"abc", b"de"), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "exceed the declared size", "Nothing")
    error = rpc_error(lambda: stub.Put(put_stream("k", 10, b"abc"), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "3 of 10", "Nothing")
    error = rpc_error(lambda: stub.Put(put_stream("new", 10, b"abc"), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT)
    error = rpc_error(lambda: stub.Put(iter([pb.PutRequest(chunk=b"abc")]), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "must start with a PutHeader")
    error = rpc_error(lambda: stub.Put(iter([]), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "must start with a PutHeader")
    two_headers = iter([pb.PutRequest(header=pb.PutHeader(key="k", size=1))] * 2)
    error = rpc_error(lambda: stub.Put(two_headers, timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "second header")
    with Client(daemon.address) as client:
        assert client.get("k") == b"old value"
        with pytest.raises(KeyError):
            client.get("new")
        assert [info.key for info in client.list_keys()] == ["k"]


def test_cancelled_put_leaves_old_value_and_no_partial(
    stub: pb_grpc.MemctlServiceStub, daemon: Daemon
) -> None:
    with Client(daemon.address) as client:
        client.put("k", b"old value")
    for key in ("k", "fresh"):
        future = _cancel_midway(stub, key)
        assert future.cancelled()
    with Client(daemon.address) as client:
        # The daemon saw the cancellation: nothing new, the old value intact.
        assert client.get("k") == b"old value"
        with pytest.raises(KeyError):
            client.get("fresh")
        assert client.status().service.keys_in_memory == 1


def _cancel_midway(stub: pb_grpc.MemctlServiceStub, key: str) -> grpc.Future:
    """Start a Put of 8 MiB, send half, then cancel the call."""
    halfway = threading.Event()
    done = threading.Event()

    def requests() -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(key=key, size=8 * MiB))
        for _ in range(4):
            yield pb.PutRequest(chunk=b"n" * MiB)
        halfway.set()
        done.wait(30)

    future = stub.Put.future(requests(), timeout=30)
    assert halfway.wait(30)
    future.cancel()
    done.set()
    return future


def test_missing_key_is_not_found(stub: pb_grpc.MemctlServiceStub, daemon: Daemon) -> None:
    error = rpc_error(lambda: list(stub.Get(pb.GetRequest(key="nope"), timeout=10)))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "'nope'")
    error = rpc_error(lambda: stub.Evict(pb.EvictRequest(keys=["nope"]), timeout=10))
    assert_status(error, grpc.StatusCode.NOT_FOUND, "nothing was moved")
    error = rpc_error(lambda: stub.Evict(pb.EvictRequest(), timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "exactly one")
    assert stub.Delete(pb.DeleteRequest(keys=["nope"]), timeout=10).deleted == 0
    with Client(daemon.address) as client:
        with pytest.raises(KeyError):
            client.get("nope")
        with pytest.raises(KeyError):
            client.stat("nope")
    result = run_memctl("get", "--address", daemon.address, "nope")
    assert result.returncode == 1
    assert result.stderr.decode().strip() == "memctl get: no value under key 'nope'"


def test_oversized_metadata_is_invalid_argument(stub: pb_grpc.MemctlServiceStub) -> None:
    header = pb.PutHeader(key="m", size=1, metadata=b"x" * (64 * 1024 + 1))
    requests = iter([pb.PutRequest(header=header), pb.PutRequest(chunk=b"x")])
    error = rpc_error(lambda: stub.Put(requests, timeout=10))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "metadata")


def test_value_that_fits_nowhere_is_resource_exhausted(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "8MiB", "--set", "memory.max-spill=4MiB")
    with Client(daemon.address) as client:
        with pytest.raises(ResourceExhausted, match=r"memory limit 8\.00 MiB.*max-spill 4\.00 MiB"):
            client.put("huge", b"x" * (16 * MiB))
        with pytest.raises(KeyError):
            client.get("huge")
        client.put("fits", b"y" * MiB)  # still serving
        assert client.get("fits") == b"y" * MiB


def test_full_spill_keeps_values_in_ram_and_logs_once(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "40MiB", "--set", "memory.max-spill=6MiB")
    values = {f"v{i}": os.urandom(4 * MiB) for i in range(10)}
    with Client(daemon.address) as client:
        for key, value in values.items():
            client.put(key, value)
        status = client.status().service
        assert status.spilled <= 6 * MiB
        assert status.keys_in_memory + status.keys_on_disk == 10
        result = client.evict()
        assert result.error and "max-spill" in result.error
        for key, value in values.items():
            assert client.get(key) == value
    warnings = [line for line in daemon.log().splitlines() if "Spill to disk failed" in line]
    assert 1 <= len(warnings) <= 2, warnings
    assert "raise memory.max-spill or delete values" in warnings[0]


def test_second_daemon_on_same_address_fails_loudly(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    first = spawn(address="127.0.0.1:0")
    with pytest.raises(AssertionError, match=r"cannot listen on 127\.0\.0\.1"):
        start_daemon(tmp_path / "second", address=first.address)
    unix_first = spawn()
    with pytest.raises(AssertionError, match="another process"):
        start_daemon(tmp_path / "third", address=unix_first.address)
    for daemon in (first, unix_first):
        with Client(daemon.address) as client:
            assert client.status().service.name == "service"


def test_stale_unix_socket_is_replaced(tmp_path: Path, spawn: Callable[..., Daemon]) -> None:
    path = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()  # a socket file nobody listens on, as a killed daemon leaves
    daemon = spawn(address=f"unix:{path}")
    with Client(daemon.address) as client:
        assert client.status().version


def test_bad_config_file_stops_startup(tmp_path: Path) -> None:
    config = tmp_path / "memctl.yaml"
    config.write_text("memory:\n  target: 1.7\n")
    result = run_memctl("serve", "--config", str(config), "--address", f"unix:{tmp_path}/s")
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "memory.target" in lines[0] and "1.7" in lines[0]
    result = run_memctl("serve", "--memory-limit", "lots", "--address", f"unix:{tmp_path}/s")
    assert result.returncode == 2
    assert "memory-limit" in result.stderr.decode() and "lots" in result.stderr.decode()


def test_health_and_reflection_are_served(daemon: Daemon) -> None:
    with raw_channel(daemon.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "memctl.v1.MemctlService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = reflection.ServerReflectionInfo(iter([request]), timeout=10)
        names = {s.name for s in response.list_services_response.service}
        assert "memctl.v1.MemctlService" in names


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_drains_in_flight_put_and_exits_zero(spawn: Callable[..., Daemon], sig: int) -> None:
    daemon = spawn()
    halfway = threading.Event()
    signalled = threading.Event()

    def requests() -> Iterator[pb.PutRequest]:
        yield pb.PutRequest(header=pb.PutHeader(key="k", size=2 * MiB))
        yield pb.PutRequest(chunk=b"a" * MiB)
        halfway.set()
        signalled.wait(30)
        yield pb.PutRequest(chunk=b"b" * MiB)

    with raw_channel(daemon.address) as channel:
        future = pb_grpc.MemctlServiceStub(channel).Put.future(requests(), timeout=30)
        assert halfway.wait(30)
        daemon.process.send_signal(sig)
        wait_until(lambda: "Shutting down" in daemon.log())
        signalled.set()
        assert future.result().size == 2 * MiB  # drained, not cut off
    assert daemon.process.wait(10) == 0
