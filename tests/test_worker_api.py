"""The Python worker API (``Client.attach()`` / ``memctl.worker``) against real daemons:
sessions, scoped data, refusals, kept values, commands and results, re-attaching after
a daemon restart."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest

from memctl import Client
from memctl.errors import FailedPrecondition, InvalidArgument
from memctl.results import ScopeStatus
from memctl.worker import Command, SessionInfo
from tests.conftest import DATA_PLANE, Daemon, wait_until

pytestmark = DATA_PLANE

MiB = 1 << 20


def scope(client: Client, name: str) -> ScopeStatus | None:
    found = [s for s in client.status().scopes if s.name == name]
    return found[0] if found else None


def sessions_sent(client: Client) -> list[str]:
    """The session ids the client's calls carry."""
    return [value for key, value in client.metadata if key == "memctl-session"]


def test_attach_returns_the_session_and_scopes_the_client(daemon: Daemon) -> None:
    with Client(daemon.address) as client:
        session = client.attach("w1", memory_limit="200MiB")
        assert session.memory_limit == 209_715_200
        assert session.thresholds == {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
        assert session.session_id and session.state == "running" and session.connected
        assert session.keys_kept == 0 and session.reattached == 0
        assert session.heartbeat_interval > 0
        assert sessions_sent(client) == [session.session_id]
        session.close()
        assert not sessions_sent(client) and session.closed and not session.connected


def test_puts_through_an_attached_client_land_in_the_worker_scope(daemon: Daemon) -> None:
    with Client(daemon.address) as client, Client(daemon.address) as observer:
        with client.attach("w1", memory_limit="200MiB"):
            client.put("x", b"v" * MiB)
            w1 = scope(observer, "w1")
            assert w1 is not None
            assert w1.kind == "worker" and w1.state == "running" and w1.pid == os.getpid()
            assert w1.managed == MiB and w1.keys_in_memory == 1
            assert w1.memory_limit == 209_715_200
            assert observer.status().service.managed == 0
            assert client.get("x") == b"v" * MiB
        # Closed: the client's calls belong to the service scope again.
        client.put("y", b"s" * 1000)
        assert observer.status().service.managed == 1000
        with pytest.raises(KeyError):
            client.get("x")


def test_a_live_worker_id_is_refused_and_bad_hellos_raise(daemon: Daemon) -> None:
    with Client(daemon.address) as one, Client(daemon.address) as two:
        with one.attach("same") as session:
            with pytest.raises(FailedPrecondition, match="already attached"):
                two.attach("same")
            assert session.connected and session.state == "running"
            assert not sessions_sent(two)
        with pytest.raises(InvalidArgument):
            two.attach("")
        with pytest.raises(InvalidArgument, match="lots"):
            two.attach("w", memory_limit="lots")
        assert not sessions_sent(two)


def test_reattaching_with_the_same_id_gets_the_values_back(daemon: Daemon) -> None:
    with Client(daemon.address) as client, Client(daemon.address) as observer:
        with client.attach("w1", memory_limit="1GiB") as first:
            for i in range(3):
                client.put(f"k{i}", f"value {i}".encode())

        def detached() -> bool:
            w1 = scope(observer, "w1")
            return w1 is not None and w1.state == "detached"

        wait_until(detached)
        secret = first.resume_secret
        with client.attach("w1", memory_limit="1GiB", resume_secret=secret) as session:
            assert session.keys_kept == 3
            assert [client.get(f"k{i}") for i in range(3)] == [b"value 0", b"value 1", b"value 2"]


def test_a_trim_from_another_client_reaches_the_worker(daemon: Daemon) -> None:
    with Client(daemon.address) as client, client.attach("w1") as session:
        seen: list[Command] = []
        session.on("trim", seen.append)
        with Client(daemon.address) as other:
            assert other.trim(workers=True).workers_asked == 1
            command = session.wait_for("trim", timeout=30)
            assert command.type == "trim" and command.reason
            assert seen == [command]
            assert session.state == "running"  # TRIM changes nothing
            wait_until(lambda: f"answered command {command.id}: ok" in daemon.log())

            # A failing callback is reported in the result and stops nothing.
            def broken(command: Command) -> None:
                raise RuntimeError("cache already gone")

            session.on("trim", broken)
            assert other.trim(workers=True).workers_asked == 1
            second = session.wait_for("trim", timeout=30)
            assert seen == [command, second]
            wait_until(lambda: f"answered command {second.id}: failed" in daemon.log())
            assert "cache already gone" in daemon.log()
            assert session.connected


def test_heartbeats_keep_a_busy_worker_attached(spawn: Callable[..., Daemon]) -> None:
    # Heartbeats do not wait for callbacks: a callback busy for longer than the
    # heartbeat timeout does not get the worker detached. (Reporting its RSS, the
    # worker is kept by its heartbeats alone, not by its process being seen alive.)
    daemon = spawn(
        "--set", "control.heartbeat-interval=0.1s", "--set", "control.heartbeat-timeout=1s"
    )
    busy_for = 2.5  # the duration under test, not a synchronisation

    def busy(command: Command) -> None:
        threading.Event().wait(busy_for)

    with Client(daemon.address) as client, client.attach("w1", report_rss=True) as session:
        assert session.heartbeat_interval == pytest.approx(0.1)
        session.on("trim", busy)
        with Client(daemon.address) as other:
            assert other.trim(workers=True).workers_asked == 1
        command = session.wait_for("trim", timeout=30)
        assert time.monotonic() - command.received_at >= busy_for
        assert session.connected and session.reattached == 0
        assert "no heartbeat" not in daemon.log()
        wait_until(lambda: f"answered command {command.id}: ok" in daemon.log())


def test_one_session_per_client(daemon: Daemon) -> None:
    with Client(daemon.address) as client, client.attach("w1"):
        with pytest.raises(InvalidArgument, match="one Client per worker"):
            client.attach("w2")
        with Client(daemon.address) as other, other.attach("w2") as second:
            assert second.connected


def test_commands_carry_reason_and_readings(daemon: Daemon) -> None:
    # This process's RSS is far above a 10 MiB limit: the monitor pauses, then
    # terminates the worker (it did not start it, so it only sends the commands).
    with Client(daemon.address) as client, client.attach("w1", memory_limit="10MiB") as session:
        pause = session.wait_for("pause", timeout=30)
        assert "pause threshold" in pause.reason
        assert pause.memory_limit == 10 * MiB
        assert pause.readings["process"] > 10 * MiB
        terminate = session.wait_for("terminate", timeout=30)
        assert terminate.id > pause.id
        assert session.state == "terminating"


def test_heartbeats_report_rss_for_an_invisible_pid(daemon: Daemon) -> None:
    # A PID the service cannot see (as from another PID namespace): it relies on the
    # RSS the heartbeats carry.
    with (
        Client(daemon.address) as client,
        Client(daemon.address) as observer,
        client.attach("w1", pid=2**31 - 1, report_rss=True),
    ):

        def reported() -> bool:
            w1 = scope(observer, "w1")
            return w1 is not None and w1.process > MiB

        wait_until(reported, timeout=30)


def test_a_daemon_restart_on_the_same_socket_is_survived(spawn: Callable[..., Daemon]) -> None:
    first = spawn()
    with Client(first.address) as client, client.attach("w1", memory_limit="1GiB") as session:
        attached: list[SessionInfo] = []
        session.on("attach", attached.append)
        old_id = session.session_id
        assert first.stop() == 0
        wait_until(lambda: not session.connected)
        second = spawn(address=first.address)
        wait_until(lambda: session.reattached == 1 and session.connected, timeout=60)
        assert session.state == "running"
        assert session.session_id != old_id
        assert [info.session_id for info in attached] == [session.session_id]
        assert sessions_sent(client) == [session.session_id]
        client.put("after", b"restart")
        with Client(second.address) as observer:
            w1 = scope(observer, "w1")
            assert w1 is not None and w1.managed == len(b"restart")
