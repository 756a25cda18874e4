"""``memctl serve``: start the gRPC server, run until SIGTERM or SIGINT, clean up.

Process-level concerns only: resolving the configuration into settings, the
private spill directory, the token and its file (``auth.py``), binding under the
bind rules, with TLS if configured (``listener.py``), health and reflection,
signals and graceful drain. ``build_server`` assembles all of it but signals and
the stdout lines, so tests can run a daemon inside their own event loop. The
domain is in ``core.py``; the call rules every method shares in ``edge.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import signal
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from memctl import wire
from memctl.auth import runtime_directory, unix_socket_path
from memctl.sizes import format_bytes
from memctl.trim import pin_mmap_threshold
from memctl.v1 import memctl_pb2 as pb

from .auth import (
    Authenticator,
    AuthInterceptor,
    configured_token,
    new_token,
    open_runtime_directory,
    remove_token_file,
    write_token_file,
)
from .channel import ChannelSettings, SameHostChannel
from .config import ServiceConfig as Config
from .control import ControlPlane
from .core import MemoryService, ServiceSettings
from .edge import add_memctl_service
from .engine import EngineSettings, Thresholds
from .errors import MemctlError, StartupError
from .limits import resolve_memory_limit, total_memory_with_source
from .listener import bind, check_bind_rules, claim_unix_socket, server_credentials, warn_insecure
from .metrics import Metrics, MetricsError, start_metrics
from .monitor import Monitor
from .nanny import Nanny
from .segments import ShmDirectory
from .service import MemctlServicer
from .spilldir import SpillDirectory, create_spill_directory, open_persistent_directory
from .store import resolve_compression

logger = logging.getLogger("memctl")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemctlService"].full_name
#: Seconds in-flight calls get to finish after SIGTERM/SIGINT.
DRAIN_GRACE = 5.0
#: Seconds between sweeps of the shared-memory directory for abandoned files.
SHM_SWEEP_INTERVAL = 10.0
#: Calls gRPC core may hold, per method, before the aio server picks them up.
MAX_QUEUED_CALLS = 50_000

SERVER_OPTIONS = [
    # A second daemon on the same port must fail, not share it.
    ("grpc.so_reuseport", 0),
    # Notice a dead peer within seconds (the control stream relies on it).
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Why a burst of calls got a bare CANCELLED: gRPC core queues the calls that have
    # arrived but that the aio server has not yet picked up (it asks core for one
    # call per method at a time, from the event loop, so a burst outruns it). That
    # backlog is shed at random between 1000 and 3000 queued calls per method (core's
    # RandomEarlyDetection, grpc.server.max_pending_requests and its _hard_limit),
    # and on the HTTP/2 transport a shed call is just unreferenced, i.e. cancelled:
    # the client sees RST_STREAM(CANCEL), CANCELLED with no message, at ~30% of a
    # 5000-call burst. A longer backlog makes such callers wait instead; what bounds
    # the work is ``limits.max-calls`` (RESOURCE_EXHAUSTED with a message), and
    # client deadlines. Each queued call costs ~10 KiB.
    ("grpc.server.max_pending_requests", MAX_QUEUED_CALLS),
    ("grpc.server.max_pending_requests_hard_limit", MAX_QUEUED_CALLS),
]


def settings_from_config(config: Config) -> tuple[ServiceSettings, SpillDirectory]:
    """Resolve limits and paths; opens the daemon's locked directory (0700): with
    ``persist``, ``memctl-data``; else a new private ``memctl-spill-*`` one, after
    removing the stale ones of dead daemons."""
    total, source = total_memory_with_source()
    memory_limit = resolve_memory_limit(config.memory_limit, total_memory=total)
    root = Path(config.local_directory)
    spill = open_persistent_directory(root) if config.persist else create_spill_directory(root)
    logger.info(
        "Host memory %s (from %s); service memory limit %s",
        format_bytes(total),
        source,
        format_bytes(memory_limit) if memory_limit else "none",
    )
    memory = config.memory
    settings = ServiceSettings(
        memory_limit=memory_limit,
        total_memory=total,
        thresholds=Thresholds(memory.target, memory.spill, memory.pause, memory.terminate),
        spill_directory=spill.path,
        max_spill=memory.max_spill,
        compression=resolve_compression(memory.spill_compression),
        monitor_interval=memory.monitor_interval,
        recent_to_old_time=memory.recent_to_old_time,
        put_wait=memory.put_wait,
        max_value_size=config.limits.max_value_size,
        persist=config.persist,
        store_factory=config.store.factory,
        store_kwargs=config.store.kwargs,
    )
    return settings, spill


class MemctlServer:
    """A daemon's parts, bound and ready to start: what ``memctl serve`` runs, and what
    tests start in their own event loop (``async with build_server(config) as server``).

    ``start()`` serves (health SERVING, monitor and nanny running); ``stop()`` drains
    in-flight calls and releases everything, removing the spill directory (with
    ``persist``, writes every value to disk and keeps it).
    """

    def __init__(
        self,
        config: Config,
        spill: SpillDirectory,
        core: MemoryService,
        control: ControlPlane,
        metrics: Metrics | None,
        server: grpc.aio.Server,
        health_servicer: health.aio.HealthServicer,
        address: str,
        authenticator: Authenticator,
        channel: SameHostChannel | None = None,
    ):
        self.config = config
        self.channel = channel
        self.spill = spill
        self.core = core
        self.control = control
        self.metrics = metrics
        self.server = server
        self.health = health_servicer
        #: The address really bound (port 0 resolved).
        self.address = address
        self.authenticator = authenticator
        self.nanny: Nanny | None = None
        self._background: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        try:
            await self.server.start()
            for name in ("", SERVICE_NAME):
                await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
            config = self.config
            monitor = Monitor(
                self.core,
                self.control,
                self.core.events,
                EngineSettings(
                    resume_margin=config.memory.resume_margin,
                    pause_timeout=config.memory.pause_timeout,
                ),
                self.core.settings.monitor_interval,
            )
            self.control.evaluator = monitor
            self._background.append(asyncio.create_task(monitor.run()))
            if self.channel is not None:
                self.channel.start()
                if self.channel.shm is not None:
                    self._background.append(asyncio.create_task(_sweep(self.channel.shm)))
            if config.nanny.worker:
                self.nanny = Nanny(
                    config.nanny.worker,
                    config.nanny.nworkers,
                    environ=config.nanny.environ,
                    address=self.address,
                    terminate_notice=config.nanny.terminate_notice,
                    terminate_grace=config.nanny.terminate_grace,
                    events=self.core.events,
                    authenticator=self.authenticator,
                )
                self.control.supervisor = self.nanny
                self.nanny.start()
        except BaseException:
            await self.server.stop(None)
            self._release()
            raise
        logger.info(
            "memctl %s serving on %s, spilling to %s; %s",
            self.core.version,
            self.address,
            self.spill.path,
            f"token in {self.authenticator.token_path}"
            if self.authenticator.enabled
            else "no authentication (auth: none)",
        )

    async def stop(self, grace: float = DRAIN_GRACE) -> None:
        """Stop accepting calls, let in-flight ones finish (up to ``grace`` s), clean up."""
        logger.info("Shutting down: draining in-flight calls (up to %.0f s)", grace)
        try:
            await self.health.enter_graceful_shutdown()
            self.control.shutdown()
            if self.nanny is not None:
                await self.nanny.stop()
            await self.server.stop(grace)
            if self.channel is not None:
                self.channel.close()
            if self.core.settings.persist:
                await self.core.write_all_to_disk()
        finally:
            self._release()
        logger.info("memctl stopped")

    def _release(self) -> None:
        for task in self._background:
            task.cancel()
        if self.metrics is not None:
            self.metrics.shutdown()
        if self.channel is not None:
            self.channel.close()
        self.core.close()
        self.spill.close(remove=not self.core.settings.persist)
        _release_listener(self.address, self.authenticator)

    async def __aenter__(self) -> MemctlServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()


async def _sweep(shm: ShmDirectory) -> None:
    """Remove, now and then, shared-memory files whose writer died before handing
    them over."""
    while True:
        await asyncio.sleep(SHM_SWEEP_INTERVAL)
        await asyncio.to_thread(shm.sweep)


def same_host_channel(
    config: Config, address: str, core: MemoryService, authenticator: Authenticator
) -> SameHostChannel:
    """The same-host channel for a daemon bound at ``address``, its socket bound."""
    same_host = config.same_host
    if same_host.socket is not None:
        path = Path(same_host.socket)
    else:
        directory = open_runtime_directory(runtime_directory(config.runtime_directory))
        digest = hashlib.sha256(address.encode()).hexdigest()[:16]
        path = directory / f"channel-{digest}.sock"
    claim_unix_socket(path)
    shm = None
    shm_root = Path(same_host.shm_directory or "/dev/shm")
    if same_host.shm_directory is not None or shm_root.is_dir():
        try:
            shm = ShmDirectory.create(shm_root)
        except OSError as exc:
            raise StartupError(
                f"cannot create a shared-memory directory in {shm_root}: {exc.strerror}; "
                "set same-host.shm-directory"
            ) from exc
    channel = SameHostChannel(
        ChannelSettings(
            socket_path=path,
            segment_threshold=same_host.segment_threshold,
            max_frame=config.limits.max_message_size,
            max_connections=same_host.max_connections,
            put_wait=config.memory.put_wait,
        ),
        core,
        authenticator,
        shm,
    )
    try:
        channel.bind()
    except OSError as exc:
        channel.close()
        raise StartupError(
            f"cannot listen on the same-host channel's socket {path}: {exc.strerror}; set "
            "same-host.socket, or same-host.enabled: false"
        ) from exc
    return channel


def same_host_pb(channel: SameHostChannel) -> pb.SameHost:
    return pb.SameHost(
        socket_path=str(channel.path),
        shm_directory=str(channel.shm.path) if channel.shm is not None else "",
        segment_threshold=channel.settings.segment_threshold,
        instance_id=channel.instance_id,
        version=wire.VERSION,
    )


def _release_listener(address: str, authenticator: Authenticator) -> None:
    """Remove what binding left on disk: the unix socket, the token file."""
    unix = unix_socket_path(address)
    if unix is not None:
        unix.unlink(missing_ok=True)
    if authenticator.token is not None and authenticator.token_path is not None:
        remove_token_file(authenticator.token_path, authenticator.token)


def _authenticator(config: Config) -> Authenticator:
    """The daemon's token (``token-file``'s, else a new one); none with ``auth: none``."""
    if config.auth == "none":
        return Authenticator(None, None)
    token = configured_token(Path(config.token_file)) if config.token_file else new_token()
    return Authenticator(token, None)


def build_server(config: Config) -> MemctlServer:
    """Everything ``memctl serve`` sets up, bound to ``config.address`` but not started.

    Call it inside a running event loop (grpc's aio server binds to it). Raises
    StartupError, having released what it made, when the daemon cannot start.
    """
    exposed = check_bind_rules(config)
    credentials = server_credentials(config)
    authenticator = _authenticator(config)
    runtime = None
    if authenticator.enabled:
        runtime = open_runtime_directory(runtime_directory(config.runtime_directory))
    settings, spill = settings_from_config(config)
    core: MemoryService | None = None
    metrics: Metrics | None = None
    address: str | None = None
    channel: SameHostChannel | None = None
    try:
        core = MemoryService(settings)
        metrics = start_metrics(core, config.metrics)
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if metrics is not None:
            interceptors.append(metrics.interceptor)  # first, so refused calls count too
        if authenticator.enabled:
            interceptors.append(AuthInterceptor(authenticator))
        limits = config.limits
        server = grpc.aio.server(
            options=[
                *SERVER_OPTIONS,
                ("grpc.max_receive_message_length", limits.max_message_size),
            ],
            interceptors=interceptors or None,
        )
        control = ControlPlane(
            core,
            heartbeat_interval=config.control.heartbeat_interval,
            heartbeat_timeout=config.control.heartbeat_timeout,
            retention=config.control.retention,
            max_sessions_per_client=limits.max_sessions_per_client,
            # With persist, kept workers' resume secrets must outlive the daemon too.
            identity_file=spill.path / "identities.json" if config.persist else None,
        )
        servicer = MemctlServicer(core, control, authenticator)
        add_memctl_service(
            server,
            servicer,
            max_calls=limits.max_calls,
            max_calls_per_client=limits.max_calls_per_client,
        )
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (
                SERVICE_NAME,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        address = bind(server, config, credentials)
        if exposed:
            warn_insecure(address)
        if runtime is not None and authenticator.token is not None:
            try:
                authenticator.token_path = write_token_file(runtime, address, authenticator.token)
            except OSError as exc:
                raise StartupError(
                    f"cannot write the token file in {runtime}: {exc.strerror}"
                ) from exc
        if config.same_host.enabled:
            channel = same_host_channel(config, address, core, authenticator)
            servicer.same_host = same_host_pb(channel)
    except BaseException as exc:
        if channel is not None:
            channel.close()
        if address is not None:
            _release_listener(address, authenticator)
        if metrics is not None:
            metrics.shutdown()
        if core is not None:
            core.close()
        spill.close(remove=not config.persist)
        if isinstance(exc, MemctlError | MetricsError):
            raise StartupError(str(exc)) from exc
        raise
    return MemctlServer(
        config,
        spill,
        core,
        control,
        metrics,
        server,
        health_servicer,
        address,
        authenticator,
        channel,
    )


async def serve(config: Config) -> int:
    """Run the daemon until SIGTERM/SIGINT; 0 on a clean exit."""
    pin_mmap_threshold()  # process-wide malloc tuning: the daemon's, not a test's
    async with build_server(config) as server:
        # Signals handled before the address is told: a SIGTERM sent as soon as the
        # line is read must stop the daemon cleanly, not kill it.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # One line on stdout, so scripts (and tests) learn the address really bound;
        # then where its token is.
        print(f"memctl serving on {server.address}", flush=True)
        if server.authenticator.token_path is not None:
            print(f"memctl token in {server.authenticator.token_path}", flush=True)
        await stop.wait()
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
