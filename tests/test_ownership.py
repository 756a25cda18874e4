"""One owner per piece of state: readers on other threads see only published snapshots.

The OpenTelemetry exporter and Prometheus' HTTP server read the service's readings
on threads of their own while the event loop attaches and releases worker scopes
and records events. Here a reader thread does what they do, in a tight loop with
the GIL switching every microsecond, against a real ``MemoryService``.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from memctl.protocol import SERVICE_SCOPE
from memctl_server.core import MemoryService, ServiceSettings
from memctl_server.engine import Thresholds
from memctl_server.metrics import _register

MiB = 1 << 20
#: Scopes the event loop opens and releases while the reader reads.
CHURN = 600


@pytest.fixture
def core(tmp_path: Path) -> Iterator[MemoryService]:
    service = MemoryService(
        ServiceSettings(
            memory_limit=1024 * MiB,
            total_memory=4096 * MiB,
            thresholds=Thresholds(),
            spill_directory=tmp_path,
            max_spill=False,
            compression="none",
            monitor_interval=0.2,
            # Tiny: every monitor sample ages out of the window almost at once.
            recent_to_old_time=1e-4,
        )
    )
    yield service
    service.close()


def test_readers_never_see_the_event_loop_mid_change(
    core: MemoryService, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = InMemoryMetricReader()  # the SDK's collection path, as an exporter runs it
    provider = MeterProvider(metric_readers=[metrics])
    _register(provider, core, core.events)
    errors: list[BaseException] = []
    reads = 0
    stop = threading.Event()

    def reader() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                snapshots = core.snapshot()
                assert snapshots[0].scope.name == SERVICE_SCOPE
                for snap in snapshots:
                    r = snap.readings
                    assert r.managed + r.unmanaged + r.unmanaged_recent == r.process
                    assert snap.scope.state.value in ("running", "paused", "detached")
                for (_kind, _scope), count in core.events.counts.items():
                    assert count >= 1
                for _scope, trimmed in core.events.trimmed_bytes.items():
                    assert trimmed >= 0
                if reads % 50 == 0:
                    assert metrics.get_metrics_data() is not None
                reads += 1
        except BaseException as exc:  # handed to the test thread
            errors.append(exc)

    async def churn() -> None:
        """What the event loop does: attach, tick, record events, release."""
        for i in range(CHURN):
            scope, _ = await core.open_worker_scope(f"w{i}", 64 * MiB, f"session-{i}")
            scope.attached = True
            core.snapshot(record=True)  # the monitor's tick
            core.events.record("trim", scope.name, "asked", rss_before=2 * MiB, rss_after=MiB)
            core.events.record("restart", scope.name, "exited with 1")
            if i % 2:
                await core.release_scope(scope)
            if errors:
                return

    thread = threading.Thread(target=reader)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        thread.start()
        asyncio.run(churn())
    finally:
        stop.set()
        thread.join()
        sys.setswitchinterval(interval)
        provider.shutdown()
    assert not errors, "shared state changed under a reader:\n" + "".join(
        traceback.format_exception(errors[0])
    )
    assert reads > 0
    # The SDK logs a failing instrument callback instead of raising it.
    failed = [r.getMessage() for r in caplog.records if r.name.startswith("opentelemetry")]
    assert not failed, failed[0]
    names = {snap.scope.name for snap in core.snapshot()}
    assert len(names) == 1 + CHURN // 2  # the even ones are still open
