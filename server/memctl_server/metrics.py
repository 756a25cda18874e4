"""OpenTelemetry metrics, read at collection time from what Status and the event log hold.

No second bookkeeping: gauges call ``MemoryService.snapshot()`` (the function Status
uses), counters read the stores' published ``SpillCounters`` and the event log's
counts. Only RPC calls are counted here, by a server interceptor that is installed
only when metrics are on: off costs nothing.

Exporters (``metrics.exporters``, else ``OTEL_METRICS_EXPORTER``): ``prometheus``
serves ``/metrics`` on 127.0.0.1:9464 (``metrics.prometheus-address``, else
``OTEL_EXPORTER_PROMETHEUS_HOST``/``PORT``); ``otlp`` pushes over gRPC to
``metrics.otlp-endpoint`` (else ``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`` /
``OTEL_EXPORTER_OTLP_ENDPOINT``, else localhost:4317) every
``metrics.export-interval`` (else ``OTEL_METRIC_EXPORT_INTERVAL``, else 60 s).

Names follow OpenTelemetry's guidance (``memctl.memory.managed``), units are UCUM
(``By``, ``s``, ``{event}``); every per-scope point has the attribute
``memctl.scope`` (``service`` or a worker id).
"""

from __future__ import annotations

import inspect
import logging
import math
import operator
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource

from memctl import __version__
from memctl.errors import status_code

from .config import MetricsConfig
from .core import MemoryService, ScopeSnapshot
from .edge import rewrap
from .events import EVENT_KINDS, EventLog
from .scopes import ScopeState
from .segments import LEDGER
from .store import SpillCounters

logger = logging.getLogger(__name__)

SCOPE = "memctl.scope"
DEFAULT_PROMETHEUS = ("127.0.0.1", 9464)
#: event kind -> (counter name, description); spills are counted in bytes instead.
_EVENT_COUNTERS = {
    "pause": ("memctl.worker.pauses", "PAUSE commands sent"),
    "resume": ("memctl.worker.resumes", "RESUME commands sent"),
    "terminate": ("memctl.worker.terminations", "TERMINATE commands sent"),
    "restart": ("memctl.worker.restarts", "Supervised workers started again"),
    "trim": ("memctl.trims", "malloc_trim calls, in the service and in workers"),
    "data_loss": ("memctl.values.lost", "Values dropped because their spill file was damaged"),
}
assert set(_EVENT_COUNTERS) | {"spill"} == set(EVENT_KINDS)


class MetricsError(ValueError):
    """The metrics settings cannot be used; the message says which and why."""


def exporter_names(config: MetricsConfig, environ: Mapping[str, str]) -> tuple[str, ...]:
    """Configured exporters, else ``OTEL_METRICS_EXPORTER``; () for none."""
    if config.exporters is not None:
        return config.exporters
    text = environ.get("OTEL_METRICS_EXPORTER", "none")
    names = tuple(n.strip().lower() for n in text.split(",") if n.strip() not in ("", "none"))
    unknown = [n for n in names if n not in ("prometheus", "otlp")]
    if unknown:
        raise MetricsError(
            f"OTEL_METRICS_EXPORTER names {unknown[0]!r}; memctl exports prometheus, otlp or none"
        )
    return names


def prometheus_address(config: MetricsConfig, environ: Mapping[str, str]) -> tuple[str, int]:
    if config.prometheus_address is not None:
        host, _, port_text = config.prometheus_address.rpartition(":")
        return host.strip("[]"), int(port_text)
    host = environ.get("OTEL_EXPORTER_PROMETHEUS_HOST", DEFAULT_PROMETHEUS[0])
    try:
        port = int(environ.get("OTEL_EXPORTER_PROMETHEUS_PORT", str(DEFAULT_PROMETHEUS[1])))
    except ValueError:
        raise MetricsError("OTEL_EXPORTER_PROMETHEUS_PORT must be a port number") from None
    return host, port


@dataclass
class Metrics:
    """The running metrics pipeline; ``interceptor`` counts RPCs."""

    provider: MeterProvider
    interceptor: RpcCounter
    prometheus_url: str | None = None
    http_server: Any = None

    def shutdown(self) -> None:
        if self.http_server is not None:
            self.http_server.shutdown()
        self.provider.shutdown()


def start_metrics(
    core: MemoryService, config: MetricsConfig, environ: Mapping[str, str] = os.environ
) -> Metrics | None:
    """Start the exporters asked for, or return None (and start nothing)."""
    names = exporter_names(config, environ)
    if not names:
        return None
    readers: list[MetricReader] = []
    prometheus_url, http_server = None, None
    if "prometheus" in names:
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry()
        readers.append(PrometheusMetricReader(registry=registry))
        host, port = prometheus_address(config, environ)
        try:
            http_server, _ = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve Prometheus metrics on {host}:{port}: {exc.strerror}; "
                "set metrics.prometheus-address"
            ) from exc
        prometheus_url = f"http://{host}:{http_server.server_port}/metrics"
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter

        endpoint = config.otlp_endpoint
        exporter = OTLPMetricExporter(
            endpoint=endpoint,
            insecure=True if endpoint and not endpoint.startswith("https://") else None,
        )
        interval = config.export_interval
        readers.append(
            PeriodicExportingMetricReader(
                exporter, export_interval_millis=interval * 1000 if interval else None
            )
        )
    provider = MeterProvider(
        metric_readers=readers,
        resource=Resource.create({"service.name": "memctl", "service.version": __version__}),
    )
    _register(provider, core, core.events)
    metrics = Metrics(provider, RpcCounter(provider), prometheus_url, http_server)
    logger.info(
        "Metrics on: %s", ", ".join(n if n != "prometheus" else str(prometheus_url) for n in names)
    )
    return metrics


class CollectionSnapshot:
    """One ``core.snapshot()`` per collection, shared by every instrument's callback.

    The SDK calls each callback on its own, back to back; with a snapshot each, the
    gauges of one scrape could disagree (managed + unmanaged + recent != process).
    """

    #: Shorter than any sensible export or scrape interval, longer than a collection.
    FRESH_FOR = 0.5

    def __init__(self, core: MemoryService):
        self.core = core
        self._lock = threading.Lock()
        self._taken = -math.inf
        self._snapshot: list[ScopeSnapshot] = []

    def __call__(self) -> list[ScopeSnapshot]:
        with self._lock:  # Prometheus' HTTP thread and OTLP's export thread
            now = time.monotonic()
            if now - self._taken > self.FRESH_FOR:
                self._snapshot, self._taken = self.core.snapshot(), now
            return self._snapshot


def _register(provider: MeterProvider, core: MemoryService, events: EventLog) -> None:
    meter = provider.get_meter("memctl", __version__)
    snapshot = CollectionSnapshot(core)

    def per_scope(read: Callable[[ScopeSnapshot], int | float]) -> Callable[..., Any]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(read(snap), {SCOPE: snap.scope.name}) for snap in snapshot()]

        return callback

    readings = {
        "process": "What the scope costs the host",
        "managed": "Sizes of the scope's values held in RAM",
        "unmanaged": "Process minus managed memory, at its minimum over recent-to-old-time",
        "unmanaged_recent": "Unmanaged memory that appeared within recent-to-old-time",
        "spilled": "Bytes of the scope's values on disk, after compression",
    }
    for name, description in readings.items():
        meter.create_observable_gauge(
            f"memctl.memory.{name}",
            callbacks=[per_scope(operator.attrgetter(f"readings.{name}"))],
            unit="By",
            description=description,
        )
    meter.create_observable_gauge(
        "memctl.memory.limit",
        callbacks=[per_scope(lambda snap: snap.scope.memory_limit or 0)],
        unit="By",
        description="The scope's memory limit (0: none)",
    )

    def states(options: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(
                int(snap.scope.state is state),
                {SCOPE: snap.scope.name, "memctl.scope.state": state.value},
            )
            for snap in snapshot()
            for state in ScopeState
        ]

    meter.create_observable_gauge(
        "memctl.scope.state",
        callbacks=[states],
        unit="1",
        description="1 for the scope's current state (running, paused, terminating, detached)",
    )

    def store_counter(read: Callable[[SpillCounters], int | float]) -> Callable[..., Any]:
        return per_scope(lambda snap: read(snap.sizes.counters))

    for name, unit, read, description in (
        ("memctl.spill.bytes", "By", lambda c: c.spilled_bytes, "In-RAM bytes moved to disk"),
        ("memctl.spill.values", "{value}", lambda c: c.spilled_values, "Values moved to disk"),
        ("memctl.spill.duration", "s", lambda c: c.spill_seconds, "Time spent writing spills"),
        ("memctl.unspill.bytes", "By", lambda c: c.read_bytes, "Bytes read back from disk"),
        ("memctl.unspill.values", "{value}", lambda c: c.read_values, "Values read back"),
    ):
        meter.create_observable_counter(
            name, callbacks=[store_counter(read)], unit=unit, description=description
        )

    def event_counter(kind: str) -> Callable[..., Any]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [
                Observation(count, {SCOPE: scope})
                for (counted, scope), count in events.counts.items()
                if counted == kind
            ]

        return callback

    for kind, (name, description) in _EVENT_COUNTERS.items():
        meter.create_observable_counter(
            name, callbacks=[event_counter(kind)], unit="{event}", description=description
        )

    def pipeline_counter(field: str) -> Callable[..., Any]:
        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(getattr(core.pipeline, field))]

        return callback

    meter.create_observable_counter(
        "memctl.pipeline.messages",
        callbacks=[pipeline_counter("messages")],
        unit="{message}",
        description="Pipeline messages received",
    )
    meter.create_observable_counter(
        "memctl.pipeline.operations",
        callbacks=[pipeline_counter("operations")],
        unit="{operation}",
        description="Operations received in Pipeline messages (per message: how well "
        "clients' calls coalesce)",
    )

    def same_host_operations(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(core.same_host.operations)]

    def same_host_connections(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(core.same_host.connections)]

    def segment_bytes(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(LEDGER.bytes)]

    meter.create_observable_counter(
        "memctl.same_host.operations",
        callbacks=[same_host_operations],
        unit="{operation}",
        description="Frames received on the same-host channel",
    )
    meter.create_observable_gauge(
        "memctl.same_host.connections",
        callbacks=[same_host_connections],
        unit="{connection}",
        description="Same-host channel connections open",
    )
    meter.create_observable_gauge(
        "memctl.segments.size",
        callbacks=[segment_bytes],
        unit="By",
        description="Bytes of the shared-memory segments the daemon holds (values put "
        "over the same-host channel; counted in managed)",
    )

    def trimmed(options: CallbackOptions) -> Iterable[Observation]:
        return [Observation(n, {SCOPE: scope}) for scope, n in events.trimmed_bytes.items()]

    meter.create_observable_counter(
        "memctl.trim.bytes",
        callbacks=[trimmed],
        unit="By",
        description="RSS given back to the OS by trims",
    )


class RpcCounter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts RPCs by method and status code (``memctl.rpc.requests``)."""

    def __init__(self, provider: MeterProvider):
        self.counter = provider.get_meter("memctl", __version__).create_counter(
            "memctl.rpc.requests", unit="{request}", description="RPCs handled, by outcome"
        )

    def _count(self, method: str, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        code = context.code() or grpc.StatusCode.OK
        if isinstance(code, int):
            code = status_code(code)
        self.counter.add(1, {"rpc.method": method, "rpc.grpc.status_code": code.name})

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method.rsplit("/", 1)[-1]
        return rewrap(handler, lambda behaviour: self._wrap(behaviour, method))

    def _wrap(self, behaviour: Callable[..., Any], method: str) -> Callable[..., Any]:
        if inspect.isasyncgenfunction(behaviour):

            async def streaming(request: Any, context: Any) -> Any:
                try:
                    async for response in behaviour(request, context):
                        yield response
                finally:
                    self._count(method, context)

            return streaming

        async def unary(request: Any, context: Any) -> Any:
            try:
                return await behaviour(request, context)
            finally:
                self._count(method, context)

        return unary
