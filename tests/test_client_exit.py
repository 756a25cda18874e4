"""A closed client leaves none of gRPC's call objects to the cycle collector.

gRPC raises a failed streaming call as the call object itself, whose traceback leads
back to it: a reference cycle. Collected only at interpreter exit, the call's
``__del__`` waits there for a lock that one of gRPC's threads, stopped by the exit,
may hold, and the process never exits: a ``memctl get`` over TLS once printed its
value and hung (about one run in 500 on a loaded machine). The client cuts those
cycles as it reads a failure's status, and ``close`` waits for its stream to end;
these tests prove no call object is left in a cycle, which is what the hang needed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator

import grpc._channel
import pytest

from memctl import Client
from memctl.errors import InvalidArgument
from tests.conftest import Daemon


@pytest.fixture
def cyclic_calls() -> Iterator[Callable[[], list[object]]]:
    """Save whatever the cycle collector frees from now on; the function returns the
    gRPC call objects among it."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)

    def found() -> list[object]:
        gc.collect()
        return [o for o in gc.garbage if isinstance(o, grpc._channel._Rendezvous)]

    try:
        yield found
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


def test_closing_a_client_frees_its_operation_stream(
    daemon: Daemon, cyclic_calls: Callable[[], list[object]]
) -> None:
    with Client(daemon.address) as client:
        client.put("k", b"v" * 1000)
        assert client.get("k") == b"v" * 1000  # the Pipeline stream, then cancelled
    assert cyclic_calls() == []


def test_a_refused_attach_frees_its_stream(
    daemon: Daemon, cyclic_calls: Callable[[], list[object]]
) -> None:
    with Client(daemon.address) as client:
        with pytest.raises(InvalidArgument):
            client.attach("worker-1", memory_limit="lots")  # refused in its first answer
        with client.attach("worker-1", memory_limit="1 GiB") as session:
            assert session.state == "running"
    assert cyclic_calls() == []


def test_a_daemon_gone_mid_stream_leaves_no_cycle(
    daemon: Daemon, cyclic_calls: Callable[[], list[object]]
) -> None:
    client = Client(daemon.address, timeout=10)
    client.put("k", b"v")
    daemon.stop()  # the stream breaks: its reader sees UNAVAILABLE
    with pytest.raises(ConnectionError):
        client.get("k")
    client.close()
    assert cyclic_calls() == []
