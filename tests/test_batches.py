"""Batches and coalescing: PutMany, GetMany, the Pipeline stream, and the clients over them.

Every test runs a real daemon (authentication on) and real clients. Small values
travel whole in one message; values over 1 MiB still stream; a batch is all or
nothing; one bad item or operation fails alone, never its neighbours or the stream.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import crc32c
import grpc
import pytest

from memctl import AsyncClient, Client, MemctlMapping
from memctl._base import put_entry, put_operation
from memctl.errors import DataLoss, InvalidArgument
from memctl.pipeline import MAX_OPERATIONS_PER_MESSAGE, _Encoded, _encoded, _gather
from memctl.protocol import MAX_INLINE_VALUE, MAX_METADATA_BYTES
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from tests.conftest import DATA_PLANE, Daemon, wait_until
from tests.inprocess import serving
from tests.test_integrity import flip_bytes, spill_file
from tests.test_observability import free_port
from tests.tokens import raw_channel

pytestmark = DATA_PLANE

MiB = 1 << 20
#: Small values, a value exactly at the inline limit, and two that must stream.
MIXED = {
    "empty": b"",
    "small": b"s" * 1000,
    "at-limit": os.urandom(MAX_INLINE_VALUE),
    "over-limit": os.urandom(MAX_INLINE_VALUE + 1),
    "large": os.urandom(3 * MiB),
}


def test_put_many_and_get_many_round_trip_small_and_large_values(daemon: Daemon) -> None:
    with Client(daemon.address) as client:
        results = client.put_many(MIXED, metadata=b"codec-1")
        assert [r.key for r in results] == list(MIXED)
        assert [r.size for r in results] == [len(v) for v in MIXED.values()]
        got = client.get_many([*MIXED, "missing"])
        assert got == MIXED  # the missing key is left out; large ones came by Get
        for key in MIXED:
            assert client.get_value(key).metadata == b"codec-1"
        assert client.delete_many([*MIXED, "missing"]) == len(MIXED)
        assert client.get_many(MIXED) == {}
        assert client.get_many([]) == {}


def test_pairs_keep_their_order_and_a_repeated_key_keeps_the_last_value(daemon: Daemon) -> None:
    with Client(daemon.address) as client:
        results = client.put_many([("k", b"first"), ("j", b"other"), ("k", b"last")])
        assert [r.key for r in results] == ["k", "j", "k"]
        assert client.get("k") == b"last"


def test_a_batch_larger_than_one_message_is_split_and_stored_whole(daemon: Daemon) -> None:
    values = {f"v{i:04d}": os.urandom(64 * 1024) for i in range(200)}  # 12.5 MiB
    with Client(daemon.address) as client:
        assert len(client.put_many(values)) == 200
        assert client.get_many(values) == values
        assert client.status().service.keys_in_memory == 200


def test_metadata_counts_toward_a_message(daemon: Daemon) -> None:
    """100 values of 1 KiB with 64 KiB of metadata each are 6.5 MiB: more than one
    message may carry either way (4 MiB), though the values alone are 100 KiB."""
    values = {f"meta{i:03d}": os.urandom(1024) for i in range(100)}
    metadata = b"m" * MAX_METADATA_BYTES
    with Client(daemon.address) as client, raw_channel(daemon.address) as channel:
        assert [r.size for r in client.put_many(values, metadata=metadata)] == [1024] * 100
        answer = pb_grpc.MemctlServiceStub(channel).GetMany(
            pb.GetManyRequest(keys=list(values)), timeout=30
        )
        assert answer.ByteSize() < 4 * MiB
        assert any(item.streamed for item in answer.items)
        assert all(item.found for item in answer.items)
        assert client.get_many(values) == values
        assert client.get_value("meta099").metadata == metadata

    async def main() -> None:
        async with AsyncClient(daemon.address) as client:
            again = {key: value[::-1] for key, value in values.items()}
            assert len(await client.put_many(again, metadata=metadata)) == 100
            assert await client.get_many(again) == again

    asyncio.run(main())


def test_a_message_gathers_waiting_operations_up_to_its_budget() -> None:
    """The client's messages are its operations' bytes joined: they parse as one
    PipelineRequest, in order, and stop short of MESSAGE_BUDGET and of the count."""

    def keys(message: bytes) -> list[str]:
        operations = pb.PipelineRequest.FromString(message).operations
        return [
            op.put_many.items[0].key if op.HasField("put_many") else op.stat.key
            for op in operations
        ]

    waiting: queue.SimpleQueue[_Encoded | None] = queue.SimpleQueue()
    large = [_encoded(put_operation([put_entry(f"m{i}", b"x" * MiB, b"")])) for i in range(3)]
    waiting.put(large[1])
    waiting.put(large[2])
    message, held, ended = _gather(large[0], waiting.get_nowait)
    assert keys(message) == ["m0", "m1"]
    assert held == large[2] and not ended  # a third MiB would pass the budget

    small = [_encoded(pb.Operation(stat=pb.StatRequest(key=f"s{i}"))) for i in range(1500)]
    for operation in [*small[1:], None]:
        waiting.put(operation)
    message, held, ended = _gather(small[0], waiting.get_nowait)
    assert keys(message) == [f"s{i}" for i in range(MAX_OPERATIONS_PER_MESSAGE)]
    assert held is None and not ended
    first = waiting.get_nowait()
    assert first is not None
    message, held, ended = _gather(first, waiting.get_nowait)
    assert keys(message) == [f"s{i}" for i in range(MAX_OPERATIONS_PER_MESSAGE, 1500)]
    assert held is None and ended  # the end of the stream was taken


def test_the_async_client_batches_too(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.address) as client:
            results = await client.put_many(MIXED)
            assert [r.key for r in results] == list(MIXED)
            assert await client.get_many([*MIXED, "missing"]) == MIXED
            assert (await client.stat("small")).size == 1000
            assert await client.delete_many(["small", "missing"]) == 1
            with pytest.raises(KeyError):
                await client.get("small")

    asyncio.run(main())


def test_the_mapping_view_uses_batches(daemon: Daemon) -> None:
    with Client(daemon.address) as client:
        mapping = MemctlMapping(client)
        mapping.update({"a": b"1", "b": b"2"}, c=b"3")
        assert mapping.get_many(["a", "b", "c", "d"]) == {"a": b"1", "b": b"2", "c": b"3"}
        assert mapping.delete_many(["a", "d"]) == 1
        assert sorted(mapping) == ["b", "c"]


def test_put_many_is_all_or_nothing(daemon: Daemon) -> None:
    """A bad item refuses the whole call with nothing stored (raw stub: the client
    would refuse the bad key before sending)."""
    good = pb.PutItem(key="good", data=b"fine")
    cases = {
        "empty key": (pb.PutItem(key="", data=b"x"), grpc.StatusCode.INVALID_ARGUMENT),
        "too large": (
            pb.PutItem(key="big", data=b"x" * (MAX_INLINE_VALUE + 1)),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        "bad checksum": (
            pb.PutItem(key="bad", data=b"abc", crc32c=crc32c.crc32c(b"abd")),
            grpc.StatusCode.DATA_LOSS,
        ),
    }
    with raw_channel(daemon.address) as channel, Client(daemon.address) as client:
        stub = pb_grpc.MemctlServiceStub(channel)
        for what, (bad, code) in cases.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.PutMany(pb.PutManyRequest(items=[good, bad]), timeout=30)
            assert info.value.code() == code, what
            assert "nothing was stored" in (info.value.details() or ""), what
            with pytest.raises(KeyError):
                client.get("good")
        with pytest.raises(grpc.RpcError) as info:
            stub.PutMany(pb.PutManyRequest(), timeout=30)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        answer = stub.PutMany(pb.PutManyRequest(items=[good]), timeout=30)
        assert answer.results[0].location == pb.LOCATION_MEMORY
    assert "Traceback" not in daemon.log()


def test_the_client_checks_a_batch_before_sending_any_of_it(daemon: Daemon) -> None:
    with Client(daemon.address) as client:
        with pytest.raises(InvalidArgument, match="empty"):
            client.put_many({"fine": b"1", "": b"2"})
        assert client.get_many(["fine"]) == {}


def test_get_many_reports_a_damaged_value_in_its_own_item(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "1GiB")
    values = {f"value-{i}": os.urandom(100_000) for i in range(3)}
    with Client(daemon.address) as client, raw_channel(daemon.address) as channel:
        client.put_many(values)
        client.evict()
        flip_bytes(spill_file(daemon, "value-1"))
        answer = pb_grpc.MemctlServiceStub(channel).GetMany(
            pb.GetManyRequest(keys=list(values)), timeout=30
        )
        by_key = {item.key: item for item in answer.items}
        assert by_key["value-1"].failure.code == grpc.StatusCode.DATA_LOSS.value[0]
        assert not by_key["value-1"].found
        for key in ("value-0", "value-2"):
            assert by_key[key].found and by_key[key].data == values[key]
        with pytest.raises(KeyError):  # dropped
            client.get("value-1")
        assert any(e.kind == "data_loss" for e in client.events())


def test_get_many_raises_data_loss_for_a_damaged_value(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "1GiB")
    with Client(daemon.address) as client:
        client.put_many({"a": os.urandom(50_000), "b": os.urandom(50_000)})
        client.evict()
        flip_bytes(spill_file(daemon, "a"))
        with pytest.raises(DataLoss, match="'a'"):
            client.get_many(["a", "b"])


def test_get_many_sends_past_its_budget_by_get(daemon: Daemon) -> None:
    """Ten values of 1 MiB exceed what one answer carries (4 MiB): the rest are
    marked streamed, and the client reads them with Get."""
    values = {f"m{i}": os.urandom(MAX_INLINE_VALUE) for i in range(10)}
    with Client(daemon.address) as client, raw_channel(daemon.address) as channel:
        client.put_many(values)
        answer = pb_grpc.MemctlServiceStub(channel).GetMany(
            pb.GetManyRequest(keys=list(values)), timeout=30
        )
        inline = [item for item in answer.items if not item.streamed]
        assert 1 <= len(inline) <= 4
        assert all(item.found for item in answer.items)
        assert client.get_many(values) == values


def test_one_failed_operation_leaves_the_rest_of_its_message_alone(daemon: Daemon) -> None:
    with raw_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        message = pb.PipelineRequest(
            operations=[
                pb.Operation(
                    id=1, put_many=pb.PutManyRequest(items=[pb.PutItem(key="k", data=b"v")])
                ),
                pb.Operation(id=2, stat=pb.StatRequest(key="missing")),
                pb.Operation(id=3, get_many=pb.GetManyRequest(keys=["k"])),
                pb.Operation(id=4),
                pb.Operation(id=5, delete=pb.DeleteRequest(keys=["k"])),
            ]
        )
        results = {}
        for response in stub.Pipeline(iter([message]), timeout=30):
            results.update({result.id: result for result in response.results})
    assert sorted(results) == [1, 2, 3, 4, 5]
    assert results[1].put_many.results[0].key == "k"
    assert results[2].failure.code == grpc.StatusCode.NOT_FOUND.value[0]
    assert results[3].get_many.items[0].data == b"v"
    assert results[4].failure.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "names no call" in results[4].failure.message
    assert results[5].delete.deleted == 1


def test_a_pipeline_without_a_token_is_refused(daemon: Daemon) -> None:
    with grpc.insecure_channel(daemon.address) as channel:
        stub = pb_grpc.MemctlServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.Pipeline(iter([pb.PipelineRequest()]), timeout=30))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_concurrent_calls_from_threads_share_messages(spawn: Callable[..., Daemon]) -> None:
    """32 threads putting and getting through one client: every value is right, and
    the daemon received fewer messages than operations (memctl.pipeline.*: gRPC's
    coalescing, so over gRPC only)."""
    metrics_port = free_port()
    daemon = spawn(
        "--set",
        "metrics.exporters=prometheus",
        "--set",
        f"metrics.prometheus-address=127.0.0.1:{metrics_port}",
    )
    errors: list[BaseException] = []
    with Client(daemon.address, transport="grpc") as client:

        def work(thread: int) -> None:
            try:
                for i in range(50):
                    key, value = f"t{thread}-{i}", f"{thread}:{i}".encode() * 10
                    client.put(key, value)
                    assert client.get(key) == value
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(n,)) for n in range(32)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert not errors, errors[0]
        assert client.status().service.keys_in_memory == 32 * 50

    def counts() -> dict[str, float]:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            name: float(line.split()[-1])
            for line in text.splitlines()
            for name in ("memctl_pipeline_messages_total", "memctl_pipeline_operations_total")
            if line.startswith(name)
        }

    wait_until(lambda: counts().get("memctl_pipeline_operations_total", 0) >= 3200)
    seen = counts()
    assert seen["memctl_pipeline_messages_total"] < seen["memctl_pipeline_operations_total"]


def test_concurrent_tasks_share_messages_too(daemon: Daemon) -> None:
    async def main() -> None:
        async with AsyncClient(daemon.address) as client:
            keys = [f"a{i}" for i in range(500)]
            await asyncio.gather(*(client.put(key, key.encode()) for key in keys))
            values = await asyncio.gather(*(client.get(key) for key in keys))
            assert values == [key.encode() for key in keys]

    asyncio.run(main())


def test_a_client_that_attaches_sends_to_its_worker_scope(daemon: Daemon) -> None:
    """The stream carries the metadata it was opened with: attaching opens a new one."""
    with Client(daemon.address) as client:
        client.put("before", b"service")  # opens the stream as the service scope
        with client.attach("w1", memory_limit="1 GiB"):
            client.put("after", b"worker")
            assert client.get_many(["before", "after"]) == {"after": b"worker"}
        status = client.status()
        worker = next(scope for scope in status.scopes if scope.name == "w1")
        assert worker.keys_in_memory == 1
        assert status.service.keys_in_memory == 1


def test_the_stream_comes_back_after_a_daemon_restart(spawn: Callable[..., Daemon]) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    daemon = spawn(address=address)
    with Client(address) as client:
        client.put("k", b"v1")
        daemon.stop()
        spawn(address=address)

        def works() -> bool:
            try:
                client.put("k", b"v2")
            except ConnectionError:
                return False
            return True

        wait_until(works)
        assert client.get("k") == b"v2"


def test_values_in_ram_are_served_while_the_store_thread_is_busy(tmp_path: Path) -> None:
    """The store thread stuck on another scope's disk work (here: held on an event)
    delays no Put, Get, Stat or Delete of values in RAM; a value on disk waits for it."""

    async def scenario() -> None:
        async with serving(tmp_path, memory_limit="1GiB") as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            await stub.PutMany(
                pb.PutManyRequest(items=[pb.PutItem(key="spilled", data=b"d" * 1000)]),
                timeout=10,
            )
            await stub.Evict(pb.EvictRequest(keys=["spilled"]), timeout=10)
            release = threading.Event()
            busy = server.core._store_thread.submit(release.wait, 30)
            try:
                put = pb.PutManyRequest(items=[pb.PutItem(key="k", data=b"v")])
                await asyncio.wait_for(stub.PutMany(put, timeout=10), 5)
                got = await asyncio.wait_for(stub.GetMany(pb.GetManyRequest(keys=["k"])), 5)
                assert got.items[0].data == b"v"
                await asyncio.wait_for(stub.Stat(pb.StatRequest(key="k")), 5)
                read_back = asyncio.ensure_future(
                    stub.GetMany(pb.GetManyRequest(keys=["spilled"]), timeout=10)
                )
                done, _ = await asyncio.wait({read_back}, timeout=0.5)
                assert not done, "a value on disk was read without the store thread"
            finally:
                release.set()
            assert busy.result(timeout=10)
            assert (await read_back).items[0].data == b"d" * 1000

    asyncio.run(scenario())
