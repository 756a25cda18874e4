"""The edge of the service: the in-process seam, undecodable requests, out-of-range
numbers, an Attach that never says hello, and a burst of calls.

Requests go through raw channels (``request_serializer=None``) where the bytes must
be ones no generated client would send.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest

from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.edge import SERVICE as SERVICE_DESCRIPTOR
from memctl_server.edge import add_memctl_service
from memctl_server.readings import UINT64_MAX, MemoryReadings
from memctl_server.service import MemctlServicer
from tests.conftest import Daemon
from tests.inprocess import raw_call, serving
from tests.tokens import raw_aio_channel, with_token

Message = TypeVar("Message")

GARBAGE = b"\xff\xff\xff"
#: A PutHeader (and a GetRequest) whose key is not UTF-8: field 1, bytes C3 28.
BAD_UTF8_KEY = b"\x0a\x02\xc3\x28"


def assert_status(error: grpc.aio.AioRpcError, code: grpc.StatusCode, *words: str) -> None:
    details = error.details() or ""
    assert error.code() == code, (error.code(), details)
    assert details and "\n" not in details and "Traceback" not in details
    for word in words:
        assert word in details, details


async def rpc_error(call: Awaitable[Any]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return info.value


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the event loop until it holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"condition not met within {timeout} s"
        await asyncio.sleep(0.02)


def test_build_server_runs_in_the_tests_event_loop(tmp_path: Path) -> None:
    async def scenario() -> Path:
        async with serving(tmp_path) as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            await stub.Put(
                iter(
                    [pb.PutRequest(header=pb.PutHeader(key="k", size=1)), pb.PutRequest(chunk=b"x")]
                )
            )
            status = await stub.Status(pb.StatusRequest())
            assert status.service.spill_directory == str(server.core.settings.spill_directory)
            assert server.core.service_scope.managed == 1
            assert server.control.attached == {}
            return server.core.settings.spill_directory

    spill_directory = asyncio.run(scenario())
    assert not spill_directory.exists()  # stop() cleaned up, as a daemon's exit does
    assert not (tmp_path / "memctl.sock").exists()


@pytest.mark.parametrize("name", [m.name for m in SERVICE_DESCRIPTOR.methods])
def test_undecodable_requests_are_invalid_argument(tmp_path: Path, name: str) -> None:
    request_type = SERVICE_DESCRIPTOR.methods_by_name[name].input_type.full_name

    async def scenario() -> None:
        async with serving(tmp_path) as (_, channel):
            error = await rpc_error(raw_call(channel, name, GARBAGE))
            assert_status(
                error, grpc.StatusCode.INVALID_ARGUMENT, f"not a valid {request_type} message"
            )
            await pb_grpc.MemctlServiceStub(channel).Status(pb.StatusRequest(), timeout=10)

    asyncio.run(scenario())


def test_invalid_utf8_and_garbage_mid_stream_are_invalid_argument(tmp_path: Path) -> None:
    header = pb.PutRequest(header=pb.PutHeader(key="k", size=6)).SerializeToString()
    chunk = pb.PutRequest(chunk=b"abc").SerializeToString()
    hello = pb.AttachRequest(hello=pb.Hello(worker_id="w")).SerializeToString()

    async def scenario() -> None:
        async with serving(tmp_path) as (server, channel):
            for name in ("Get", "Stat"):
                error = await rpc_error(raw_call(channel, name, BAD_UTF8_KEY))
                assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "bad UTF-8")
            bad_header = b"\x0a" + bytes([len(BAD_UTF8_KEY)]) + BAD_UTF8_KEY
            error = await rpc_error(raw_call(channel, "Put", bad_header, chunk))
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "PutRequest", "bad UTF-8")
            error = await rpc_error(raw_call(channel, "Put", header, chunk, GARBAGE, chunk))
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "memctl.v1.PutRequest")
            stub = pb_grpc.MemctlServiceStub(channel)
            error = await rpc_error(stub.Stat(pb.StatRequest(key="k"), timeout=10))
            assert error.code() == grpc.StatusCode.NOT_FOUND  # nothing half-stored
            error = await rpc_error(raw_call(channel, "Attach", hello, GARBAGE))
            assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "memctl.v1.AttachRequest")
            await eventually(lambda: not server.control.attached)  # detached, data kept
            assert "w" in server.core.scopes

    asyncio.run(scenario())


async def attach(
    stub: pb_grpc.MemctlServiceStub, *messages: pb.AttachRequest
) -> list[pb.AttachResponse]:
    return [r async for r in stub.Attach(iter(messages), timeout=10)]


def test_out_of_range_numbers_are_invalid_argument(tmp_path: Path) -> None:
    def hello(**fields: Any) -> pb.AttachRequest:
        return pb.AttachRequest(hello=pb.Hello(worker_id="w", **fields))

    async def scenario() -> None:
        async with serving(tmp_path) as (_, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            cases: list[tuple[Awaitable[Any], list[str]]] = [
                (attach(stub, hello(nthreads=65537)), ["nthreads", "65536"]),
                (attach(stub, hello(memory_limit="9" * 65)), ["memory_limit", "64"]),
                (stub.ListKeys(pb.ListKeysRequest(page_size=1001)), ["page_size", "1000"]),
                (stub.Events(pb.EventsRequest(limit=501)), ["limit", "500"]),
                (
                    attach(stub, hello(), pb.AttachRequest(heartbeat=pb.Heartbeat(rss=UINT64_MAX))),
                    ["Heartbeat.rss", "1 PiB"],
                ),
                (
                    attach(
                        stub,
                        hello(),
                        pb.AttachRequest(result=pb.CommandResult(command_id=1, rss_after=1 << 60)),
                    ),
                    ["CommandResult.rss_after"],
                ),
            ]
            for call, words in cases:
                assert_status(await rpc_error(call), grpc.StatusCode.INVALID_ARGUMENT, *words)
            # The edges of the ranges are fine.
            await stub.ListKeys(pb.ListKeysRequest(page_size=1000))
            await stub.Events(pb.EventsRequest(limit=500))
            responses = await attach(
                stub,
                pb.AttachRequest(hello=pb.Hello(worker_id="w2", nthreads=0)),
                pb.AttachRequest(heartbeat=pb.Heartbeat(rss=1 << 50)),
            )
            assert responses[0].session.session_id

    asyncio.run(scenario())


async def held_open(*messages: Message) -> AsyncIterator[Message]:
    """Send ``messages``, then keep the stream open until the call is cancelled."""
    for message in messages:
        yield message
    await asyncio.Event().wait()


def test_an_impossible_reading_never_breaks_status_or_events(tmp_path: Path) -> None:
    """Belt and braces: even a reading past uint64 that got in somehow still encodes."""
    assert MemoryReadings.of(process=1 << 70, managed=5, unmanaged_old=-1, spilled=1 << 65) == (
        MemoryReadings(UINT64_MAX, 5, 0, UINT64_MAX)
    )

    async def scenario() -> None:
        async with serving(tmp_path, control__heartbeat_timeout="30s") as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            stream = stub.Attach(held_open(pb.AttachRequest(hello=pb.Hello(worker_id="w"))))
            await stream.read()
            server.core.scopes["w"].reported_rss = (1 << 64) + 10  # bypassing the edge
            scopes = {s.name: s for s in (await stub.Status(pb.StatusRequest())).scopes}
            assert scopes["w"].readings.process == UINT64_MAX
            (snap,) = [s for s in server.core.snapshot() if s.scope.name == "w"]
            server.core.events.record("pause", "w", "test", snap.readings)
            (event,) = (await stub.Events(pb.EventsRequest(scope="w"))).events
            assert event.readings.process == UINT64_MAX
            stream.cancel()

    asyncio.run(scenario())


def test_an_attach_without_hello_is_closed_after_the_heartbeat_timeout(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path, control__heartbeat_timeout="1s") as (_, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            started = time.monotonic()
            call = stub.Attach(held_open(), timeout=30)
            error = await rpc_error(call.read())
            assert_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "no Hello within 1 s")
            assert time.monotonic() - started < 15

    asyncio.run(scenario())


#: Calls in the burst: gRPC core used to shed ~30% of 5000 as bare CANCELLED.
BURST = 5000


def test_a_burst_of_calls_gets_answers_never_a_bare_cancelled(daemon: Daemon) -> None:
    async def one(stub: pb_grpc.MemctlServiceStub, i: int) -> tuple[str, str]:
        try:
            if i % 5:
                await stub.Status(pb.StatusRequest(), timeout=120)
            else:
                header = pb.PutRequest(header=pb.PutHeader(key=f"k{i}", size=1))
                await stub.Put(iter([header, pb.PutRequest(chunk=b"x")]), timeout=120)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, exc.details() or ""
        return "OK", ""

    async def burst() -> collections.Counter[tuple[str, str]]:
        async with raw_aio_channel(daemon.address) as channel:
            stub = pb_grpc.MemctlServiceStub(channel)
            return collections.Counter(await asyncio.gather(*(one(stub, i) for i in range(BURST))))

    outcomes = asyncio.run(burst())
    assert sum(outcomes.values()) == BURST
    for (code, details), count in outcomes.items():
        assert code in ("OK", "RESOURCE_EXHAUSTED"), (code, details, count)
        # Past limits.max-calls ("busy") or, all calls coming over one connection,
        # limits.max-calls-per-client: either way one line saying so.
        assert code == "OK" or ("in progress" in details and "\n" not in details)
    assert outcomes["OK", ""] > BURST // 2, outcomes


def test_calls_past_the_limit_are_told_the_daemon_is_busy(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as (daemon, _):
            gated = grpc.aio.server()
            add_memctl_service(
                gated,
                MemctlServicer(daemon.core, daemon.control, daemon.authenticator),
                max_calls=1,
                max_calls_per_client=1,
            )
            gated.add_insecure_port(f"unix:{tmp_path / 'gated.sock'}")
            await gated.start()
            try:
                async with grpc.aio.insecure_channel(
                    f"unix:{tmp_path / 'gated.sock'}",
                    interceptors=with_token(daemon.authenticator.token or ""),
                ) as ch:
                    stub = pb_grpc.MemctlServiceStub(ch)
                    stream = stub.Attach(held_open(pb.AttachRequest(hello=pb.Hello(worker_id="w"))))
                    await stream.read()  # one call in progress: the limit
                    error = await rpc_error(stub.Status(pb.StatusRequest(), timeout=10))
                    assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, "busy", "retry")
                    stream.cancel()
                    await eventually(lambda: not daemon.control.attached)
                    await stub.Status(pb.StatusRequest(), timeout=10)  # the slot is free again
            finally:
                await gated.stop(None)

    asyncio.run(scenario())
