"""What makes PAUSE come fast and the idle daemon cheap, proved as behaviour (the
figures are ``benchmarks/control.py``'s): a worker reporting its RSS is paused as it
crosses the line, not at its next heartbeat; a spill under way delays no PAUSE;
Status reads the RSS the monitor published, never a process; ``ProcessRss`` reads the
process it was opened for and nothing once that one is gone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from memctl import Client
from memctl.protocol import SESSION_METADATA_KEY
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc
from memctl_server.control import ProcessRss, process_started
from tests.conftest import Daemon, wait_until
from tests.inprocess import serving
from tests.plugin_stores import HeldEvictDict
from tests.test_bad_input import put_stream
from tests.test_control import GrowerProcess, scope
from tests.test_edge import eventually, held_open

MiB = 1 << 20


def test_a_worker_reporting_rss_is_paused_as_it_crosses_not_at_its_next_heartbeat(
    spawn: Callable[..., Daemon],
) -> None:
    # Heartbeats every 10 minutes: within this test the service hears the worker's RSS
    # only in its first heartbeat (sent at once) and in those a crossing sends.
    daemon = spawn(
        "--set", "control.heartbeat-interval=600s", "--set", "control.heartbeat-timeout=1200s"
    )
    limit = 200 * MiB
    worker = GrowerProcess(daemon.address, "far", "200MiB", "--report-rss")
    try:
        worker.until("attached")
        with Client(daemon.address) as client:
            wait_until(lambda: scope(client, "far").process > 0)
            assert scope(client, "far").pid == 0  # nothing the service could read itself
        while worker.do("grow 8MiB")["rss"] <= 0.8 * limit:
            pass
        pause = worker.command("pause", timeout=60)
        assert "pause threshold (80% of 200.00 MiB" in pause["reason"]
        while worker.do("free 8MiB")["rss"] >= 0.75 * limit:
            pass
        assert "resume line (75%" in worker.command("resume", timeout=60)["reason"]
    finally:
        worker.close()


def test_a_spill_under_way_delays_no_pause_and_no_second_spill_piles_up(tmp_path: Path) -> None:
    held = HeldEvictDict
    held.EVICTING.clear()
    held.RELEASE.clear()
    held.calls = 0

    def hello(worker_id: str) -> pb.AttachRequest:
        # This process's RSS (the daemon's own: it runs in the test) is far over 8 MiB.
        return pb.AttachRequest(
            hello=pb.Hello(worker_id=worker_id, pid=os.getpid(), memory_limit="8MiB")
        )

    async def scenario() -> None:
        async with serving(tmp_path, store__factory="tests.plugin_stores:held_evict") as (
            server,
            channel,
        ):
            stub = pb_grpc.MemctlServiceStub(channel)
            spiller = stub.Attach(held_open(hello("spiller")))
            session = (await spiller.read()).session
            metadata = ((SESSION_METADATA_KEY, session.session_id),)
            await stub.Put(put_stream("k", MiB, b"x" * MiB), metadata=metadata)
            await eventually(held.EVICTING.is_set, timeout=30)  # the store thread is held

            other = stub.Attach(held_open(hello("other")))
            await other.read()  # its Session
            command = (await asyncio.wait_for(other.read(), 30)).command
            assert command.type == pb.COMMAND_TYPE_PAUSE and not held.RELEASE.is_set()

            # Ticks go on deciding to spill the held scope; none of them piles up.
            later = server.core.uptime() + 5 * server.core.settings.monitor_interval
            await eventually(lambda: server.core.uptime() > later)
            held.RELEASE.set()
            spiller_scope = server.core.scopes["spiller"]
            await server.core.stat(spiller_scope, "k")  # after whatever was queued
            assert held.calls == 1
            assert (await stub.Stat(pb.StatRequest(key="k"), metadata=metadata)).info.location == (
                pb.LOCATION_DISK
            )
            spiller.cancel()
            other.cancel()

    try:
        asyncio.run(scenario())
    finally:
        held.RELEASE.set()


def test_status_reads_the_rss_the_monitor_published(tmp_path: Path) -> None:
    async def scenario() -> None:
        # One tick, at start: what Status shows of the worker is what was read at attach.
        async with serving(tmp_path, memory__monitor_interval="1h") as (server, channel):
            stub = pb_grpc.MemctlServiceStub(channel)
            hello = pb.Hello(worker_id="w", pid=os.getpid(), memory_limit="none")
            stream = stub.Attach(held_open(pb.AttachRequest(hello=hello)))
            await stream.read()
            w = server.core.scopes["w"]
            assert w.measured_rss is not None and w.measured_rss > MiB
            w.measured_rss = 12345  # as if the monitor had read that
            status = await stub.Status(pb.StatusRequest())
            (shown,) = [s for s in status.scopes if s.name == "w"]
            assert shown.readings.process == 12345
            server.control.measure()  # what a tick does
            assert w.measured_rss > MiB
            stream.cancel()

    asyncio.run(scenario())


@pytest.mark.parametrize("proc", [True, False], ids=["proc-statm", "psutil"])
def test_process_rss_reads_the_process_it_was_opened_for_only(
    proc: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ProcessRss, "PROC", proc)  # False: as where there is no /proc
    me = psutil.Process()
    assert ProcessRss.open(me.pid, me.create_time() - 1) is None  # another process's start
    child = subprocess.Popen([sys.executable, "-c", "input()"], stdin=subprocess.PIPE)
    try:
        started = process_started(child.pid)
        assert started is not None
        reader = ProcessRss.open(child.pid, started)
        assert reader is not None
        wait_until(lambda: (reader.read() or 0) > MiB)
    finally:
        assert child.stdin is not None
        child.stdin.close()
        child.wait()
    # Gone and reaped: whoever gets its PID next, this reads nothing.
    assert reader.read() is None
    reader.close()
