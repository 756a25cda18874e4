"""Metrics, events and logs, checked by their real consumers: a Prometheus server, an
OTLP receiver, and the Events RPC."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.metrics.v1 import (
    metrics_service_pb2,
    metrics_service_pb2_grpc,
)

from memctl import Client
from tests.conftest import Daemon, run_memctl, wait_until

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def workload(client: Client) -> None:
    """Values in RAM and on disk, in the service scope."""
    for i in range(6):
        client.put(f"k{i}", os.urandom(2 * MiB))
    client.evict(["k0", "k1"])


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[int], str]]:
    """Start Debian's Prometheus scraping 127.0.0.1:PORT every second; its URL."""
    binary = shutil.which("prometheus")
    assert binary, "install Debian's prometheus package (the test command does)"
    processes: list[subprocess.Popen[bytes]] = []

    def start(target_port: int) -> str:
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            "scrape_configs:\n  - job_name: memctl\n    static_configs:\n"
            f"      - targets: ['127.0.0.1:{target_port}']\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        processes.append(
            subprocess.Popen(
                [
                    binary,
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=log,
            )
        )
        return f"http://127.0.0.1:{port}"

    yield start
    for process in processes:
        process.terminate()
        process.wait(20)


def query(base: str, promql: str) -> list[dict[str, Any]]:
    url = f"{base}/api/v1/query?{urllib.parse.urlencode({'query': promql})}"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.load(response)
    except OSError:
        return []  # not up yet
    assert body["status"] == "success", body
    return list(body["data"]["result"])


def test_prometheus_scrapes_what_status_says(
    spawn: Callable[..., Daemon], prometheus: Callable[[int], str]
) -> None:
    metrics_port = free_port()
    daemon = spawn(
        "--memory-limit",
        "1GiB",
        "--set",
        "metrics.exporters=prometheus",
        "--set",
        f"metrics.prometheus-address=127.0.0.1:{metrics_port}",
    )
    # gRPC: the scrape counts Put RPCs (the same-host channel's frames are counted apart).
    with (
        Client(daemon.address, transport="grpc") as client,
        Client(daemon.address, transport="grpc") as worker,
    ):
        workload(client)
        with worker.attach("w1", memory_limit="1GiB"):
            worker.put("x", os.urandom(3 * MiB))
            worker.evict("x")
            worker.put("y", os.urandom(MiB))
            status = {s.name: s for s in client.status().scopes}
            server = prometheus(metrics_port)

            def scraped(metric: str, scope: str) -> float | None:
                found = query(server, f'{metric}{{memctl_scope="{scope}"}}')
                return float(found[0]["value"][1]) if found else None

            for scope in ("service", "w1"):
                wait_until(
                    lambda scope=scope: (
                        scraped("memctl_memory_spilled_bytes", scope)  # type: ignore[misc]
                        is not None
                    ),
                    timeout=60,
                )
                assert scraped("memctl_memory_managed_bytes", scope) == status[scope].managed
                assert scraped("memctl_memory_spilled_bytes", scope) == status[scope].spilled
            assert status["service"].managed == 8 * MiB and status["w1"].managed == MiB
            assert status["service"].spilled > 0 and status["w1"].spilled > 0
            assert scraped("memctl_memory_limit_bytes", "w1") == 1 << 30
            puts = query(server, 'memctl_rpc_requests_total{rpc_method="Put"}')
            assert puts and float(puts[0]["value"][1]) >= 6


class Receiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """An in-process OTLP/gRPC metrics receiver (opentelemetry-proto's service)."""

    def __init__(self) -> None:
        self.requests: list[metrics_service_pb2.ExportMetricsServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return metrics_service_pb2.ExportMetricsServiceResponse()

    def metrics(self) -> dict[str, Any]:
        """The latest point of every metric, by name."""
        latest: dict[str, Any] = {}
        for request in self.requests:
            for resource in request.resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        latest[metric.name] = metric
        return latest


@pytest.fixture
def receiver() -> Iterator[tuple[Receiver, int]]:
    servicer = Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(4))
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(  # type: ignore[no-untyped-call]
        servicer, server
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, port
    server.stop(None)


def points(metric: Any) -> list[Any]:
    data = metric.gauge if metric.HasField("gauge") else metric.sum
    return list(data.data_points)


def attributes(point: Any) -> dict[str, str]:
    return {kv.key: kv.value.string_value for kv in point.attributes}


@pytest.mark.parametrize("configured_by", ["config", "OTEL_* variables"])
def test_otlp_export_names_units_attributes(
    spawn: Callable[..., Daemon], receiver: tuple[Receiver, int], configured_by: str
) -> None:
    servicer, port = receiver
    endpoint = f"http://127.0.0.1:{port}"
    if configured_by == "config":
        daemon = spawn(
            "--memory-limit", "1GiB",
            "--set", "metrics.exporters=otlp",
            "--set", f"metrics.otlp-endpoint={endpoint}",
            "--set", "metrics.export-interval=500ms",
        )  # fmt: skip
    else:
        daemon = spawn(
            "--memory-limit",
            "1GiB",
            env={
                "OTEL_METRICS_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT": endpoint,
                "OTEL_EXPORTER_OTLP_METRICS_INSECURE": "true",
                "OTEL_METRIC_EXPORT_INTERVAL": "500",
            },
        )
    with Client(daemon.address, transport="grpc") as client:  # counts RPCs
        workload(client)
        client.trim()
        expected = client.status().service
        wait_until(
            lambda: (
                "memctl.trims" in servicer.metrics()
                and any(
                    attributes(p).get("memctl.scope") == "service" and p.as_int == expected.spilled
                    for p in points(servicer.metrics()["memctl.memory.spilled"])
                )
            ),
            timeout=60,
        )
    metrics = servicer.metrics()
    units = {
        "memctl.memory.process": "By",
        "memctl.memory.managed": "By",
        "memctl.memory.unmanaged": "By",
        "memctl.memory.unmanaged_recent": "By",
        "memctl.memory.spilled": "By",
        "memctl.memory.limit": "By",
        "memctl.spill.bytes": "By",
        "memctl.spill.values": "{value}",
        "memctl.spill.duration": "s",
        "memctl.unspill.bytes": "By",
        "memctl.trims": "{event}",
        "memctl.trim.bytes": "By",
        "memctl.rpc.requests": "{request}",
    }
    for name, unit in units.items():
        assert name in metrics, name
        assert metrics[name].unit == unit, name
    # One export is one snapshot: its readings add up, as Status's do.
    parts = [
        points(metrics[f"memctl.memory.{name}"])[0].as_int
        for name in ("managed", "unmanaged", "unmanaged_recent", "process")
    ]
    assert parts[0] + parts[1] + parts[2] == parts[3]
    (managed,) = points(metrics["memctl.memory.managed"])
    assert attributes(managed) == {"memctl.scope": "service"}
    assert managed.as_int == expected.managed == 8 * MiB
    (spilled_bytes,) = points(metrics["memctl.spill.bytes"])
    assert metrics["memctl.spill.bytes"].sum.is_monotonic
    assert spilled_bytes.as_int >= 4 * MiB  # at least the two evicted values
    (limit,) = points(metrics["memctl.memory.limit"])
    assert limit.as_int == 1 << 30
    methods = {attributes(p)["rpc.method"] for p in points(metrics["memctl.rpc.requests"])}
    assert {"Put", "Evict", "Trim", "Status"} <= methods
    codes = {attributes(p)["rpc.grpc.status_code"] for p in points(metrics["memctl.rpc.requests"])}
    assert codes == {"OK"}
    resource = {
        kv.key: kv.value.string_value
        for kv in servicer.requests[-1].resource_metrics[0].resource.attributes
    }
    assert resource["service.name"] == "memctl"


def test_events_record_what_happened(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--set", "log.format=json")
    with Client(daemon.address) as client, Client(daemon.address) as worker:
        client.trim()
        with worker.attach("w", memory_limit="40MiB") as session:
            # This test process is far above 95% of 40 MiB: pause, then terminate.
            session.wait_for("terminate", timeout=30)
        events = client.events()
        kinds = [(e.kind, e.scope) for e in events]
        assert ("trim", "service") in kinds
        assert ("pause", "w") in kinds and ("terminate", "w") in kinds
        assert kinds.index(("pause", "w")) < kinds.index(("terminate", "w"))
        terminate = next(e for e in events if e.kind == "terminate")
        assert "terminate threshold (95% of 40.00 MiB" in terminate.reason
        assert terminate.readings and terminate.readings["process"] > 0.95 * 40 * MiB
        assert [e.id for e in events] == sorted(e.id for e in events)
        assert client.events(scope="w", limit=1)[0].kind in ("terminate", "pause", "spill")
        assert client.events(after_id=events[-1].id) == []
    cli = run_memctl("events", "--address", daemon.address, "--json")
    assert cli.returncode == 0, cli.stderr
    listed = [json.loads(line) for line in cli.stdout.decode().splitlines()]
    assert {"trim", "pause", "terminate"} <= {e["kind"] for e in listed}
    text = run_memctl("events", "--address", daemon.address, "--scope", "w").stdout.decode()
    assert "terminate" in text and "pause" in text and "trim" not in text
    # Every log line is one JSON object; event lines carry scope, reason and readings.
    lines = [json.loads(line) for line in daemon.log().splitlines() if line.strip()]
    logged = [line for line in lines if line["logger"] == "memctl.events"]
    pause = next(line for line in logged if line["event"] == "pause")
    assert pause["scope"] == "w" and pause["process"] > 0.8 * 40 * MiB
    assert "pause threshold" in pause["reason"]
