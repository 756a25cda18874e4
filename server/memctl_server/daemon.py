"""``memctl serve``: start the gRPC server, run until SIGTERM or SIGINT, clean up.

Process-level concerns only: resolving the configuration into settings, the
private spill directory, binding (loudly refusing an address in use), health and
reflection, signals and graceful drain. The domain is in ``core.py``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import shutil
import signal
import socket
import stat
import sys
import tempfile
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memctl.sizes import format_bytes
from memctl.trim import pin_mmap_threshold
from memctl.v1 import memctl_pb2 as pb
from memctl.v1 import memctl_pb2_grpc as pb_grpc

from .config import ServiceConfig as Config
from .control import ControlPlane
from .core import MemoryService, ServiceSettings
from .engine import EngineSettings, Thresholds
from .errors import MemctlError
from .limits import resolve_memory_limit, total_memory_with_source
from .metrics import MetricsError, start_metrics
from .monitor import Monitor
from .nanny import Nanny
from .service import MemctlServicer
from .store import resolve_compression

logger = logging.getLogger("memctl")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemctlService"].full_name
#: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
DRAIN_GRACE = 5.0

SERVER_OPTIONS = [
    # A second daemon on the same port must fail, not share it.
    ("grpc.so_reuseport", 0),
    # Notice a dead peer within seconds (the control stream relies on it).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""


def settings_from_config(config: Config) -> ServiceSettings:
    """Resolve limits and paths; creates the private spill directory (mode 0700)."""
    total, source = total_memory_with_source()
    memory_limit = resolve_memory_limit(config.memory_limit, total_memory=total)
    root = Path(config.local_directory)
    try:
        root.mkdir(parents=True, exist_ok=True)
        if config.persist:
            spill_directory = root / "memctl-data"
            spill_directory.mkdir(mode=0o700, exist_ok=True)
        else:
            spill_directory = Path(tempfile.mkdtemp(prefix="memctl-spill-", dir=root))
    except OSError as exc:
        raise StartupError(
            f"cannot create a spill directory in {root}: {exc.strerror}; "
            "choose another --local-directory"
        ) from exc
    logger.info(
        "Host memory %s (from %s); service memory limit %s",
        format_bytes(total),
        source,
        format_bytes(memory_limit) if memory_limit else "none",
    )
    memory = config.memory
    return ServiceSettings(
        memory_limit=memory_limit,
        total_memory=total,
        thresholds=Thresholds(memory.target, memory.spill, memory.pause, memory.terminate),
        spill_directory=spill_directory,
        max_spill=memory.max_spill,
        compression=resolve_compression(memory.spill_compression),
        monitor_interval=memory.monitor_interval,
        recent_to_old_time=memory.recent_to_old_time,
        put_wait=memory.put_wait,
        persist=config.persist,
        store_factory=config.store.factory,
        store_kwargs=config.store.kwargs,
    )


def _unix_path(address: str) -> Path | None:
    if address.startswith("unix://"):
        return Path(address[len("unix://") :])
    if address.startswith("unix:"):
        return Path(address[len("unix:") :])
    return None


def _claim_unix_socket(path: Path) -> None:
    """gRPC silently replaces an existing socket file: refuse if someone listens on it."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"cannot listen on unix:{path}: it exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise StartupError(f"cannot listen on unix:{path}: {exc.strerror}") from exc
        path.unlink(missing_ok=True)  # stale socket of a daemon that died
    else:
        raise StartupError(
            f"cannot listen on unix:{path}: another process (another memctl?) is serving "
            "there; stop it or choose another --address"
        )
    finally:
        probe.close()


def _bind(server: grpc.aio.Server, address: str) -> str:
    """Bind ``address``; the address really bound (port 0 resolved)."""
    unix = _unix_path(address)
    if unix is not None:
        _claim_unix_socket(unix)
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise StartupError(
            f"cannot listen on {address}: the address is in use (another memctl?) or not "
            "valid here; stop the other process or choose another --address"
        ) from exc
    if unix is None and address.rsplit(":", 1)[-1] == "0":
        return f"{address.rsplit(':', 1)[0]}:{port}"
    return address


async def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0 on a clean exit."""
    pin_mmap_threshold()
    settings = settings_from_config(config)
    try:
        core = MemoryService(settings)
        metrics = start_metrics(core, config.metrics)
    except (MemctlError, MetricsError) as exc:
        if not settings.persist:
            shutil.rmtree(settings.spill_directory, ignore_errors=True)
        raise StartupError(str(exc)) from exc
    server = grpc.aio.server(
        options=SERVER_OPTIONS, interceptors=[metrics.interceptor] if metrics else None
    )
    health_servicer = health.aio.HealthServicer()
    bound_socket: Path | None = None
    nanny: Nanny | None = None
    background: list[asyncio.Task[None]] = []
    try:
        control = ControlPlane(
            core,
            heartbeat_interval=config.control.heartbeat_interval,
            heartbeat_timeout=config.control.heartbeat_timeout,
            retention=config.control.retention,
        )
        pb_grpc.add_MemctlServiceServicer_to_server(MemctlServicer(core, control), server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = _bind(server, config.address)
        bound_socket = _unix_path(address)
        await server.start()
        for name in ("", SERVICE_NAME):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        logger.info(
            "memctl %s serving on %s, spilling to %s",
            core.version,
            address,
            settings.spill_directory,
        )
        # One line on stdout, so scripts (and tests) learn the address really bound.
        print(f"memctl serving on {address}", flush=True)

        monitor = Monitor(
            core,
            control,
            core.events,
            EngineSettings(
                resume_margin=config.memory.resume_margin,
                pause_timeout=config.memory.pause_timeout,
            ),
            settings.monitor_interval,
        )
        background.append(asyncio.create_task(monitor.run()))
        if config.nanny.worker:
            nanny = Nanny(
                config.nanny.worker,
                config.nanny.nworkers,
                environ=config.nanny.environ,
                address=address,
                terminate_notice=config.nanny.terminate_notice,
                terminate_grace=config.nanny.terminate_grace,
                events=core.events,
            )
            control.supervisor = nanny
            nanny.start()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("Shutting down: draining in-flight calls (up to %.0f s)", DRAIN_GRACE)
        await health_servicer.enter_graceful_shutdown()
        control.shutdown()
        if nanny is not None:
            await nanny.stop()
        await server.stop(DRAIN_GRACE)
        if settings.persist:
            await core.write_all_to_disk()
    finally:
        for task in background:
            task.cancel()
        if metrics is not None:
            metrics.shutdown()
        core.close()
        if not settings.persist:
            shutil.rmtree(settings.spill_directory, ignore_errors=True)
        if bound_socket is not None:
            bound_socket.unlink(missing_ok=True)
    logger.info("memctl stopped")
    return 0


class JsonFormatter(logging.Formatter):
    """One JSON object per line; events add their fields (scope, reason, readings)."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line)


def configure_logging(log_format: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)


def run(config: Config) -> int:
    """Blocking entry point for ``memctl serve``."""
    configure_logging(config.log.format)
    try:
        return asyncio.run(serve(config))
    except StartupError as exc:
        print(f"memctl serve: {exc}", file=sys.stderr)
        return 1
