"""Worker sessions: the ``Attach`` control stream, and the commands sent over it.

A worker says hello (worker id, pid, nthreads, memory limit); it gets a session and
a scope of its own. From then on the service sends PAUSE, RESUME, TERMINATE and
TRIM with the reason and the readings behind them, and expects heartbeats. A worker
whose stream breaks is detached at once; one whose heartbeats stop only if the
service cannot see its process (``alive_without_heartbeats``): a worker thread held
for seconds (one large ``mmap(MAP_POPULATE)``) delays heartbeats, not the process.
A detached worker's data is **kept** (unlike Dask), handed back when it re-attaches
with the same id, and released only after ``control.retention``.

Identity: a worker id's first attach returns a **resume secret**. While the id is
attached no one else may attach as it; once detached, its kept data goes back
only to a hello carrying that secret (else FAILED_PRECONDITION: the id stays taken
until its data is released after ``control.retention``). An id with nothing kept
is free: its next attach gets a new secret. The ids of the workers
this service started (nanny mode) are reserved for them from the start: the nanny
gives each its secret in ``MEMCTL_RESUME_SECRET``, so a restarted worker gets its
data back with no code. With ``persist``, the secrets' digests outlive a restart.

Signals: the service never signals a process it did not start, whatever PID a
client claims. A session is *supervised* only when it proves its nanny slot with
the slot's secret; only then does TERMINATE also mean SIGTERM to the process the
nanny started (never to a claimed PID), then SIGKILL — after the worker has had
``nanny.terminate-notice`` to hear why (it answers the command, its process exits
or its stream ends, whichever comes first).

Memory: the monitor reads every worker's RSS once per tick (``measure``), by PID
through ``ProcessRss``, unless the worker reports its own (``Hello.report_rss`` or
heartbeats carrying it). Such a worker is sent the lines its RSS must not cross
unreported (``RssWatch``), and a heartbeat reporting a crossing is decided on at once
(``Evaluator.reported``), not at the next tick.

Not covered here: the stream's wire I/O (``service.py``), the rules deciding
commands (``engine.py``), the processes themselves (``nanny.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import json
import logging
import mmap
import os
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import psutil

from memctl.auth import RESUME_SECRET_VARIABLE
from memctl.protocol import SERVICE_SCOPE

from .core import MemoryService
from .engine import Lines, ScopeMemo
from .errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from .limits import resolve_memory_limit
from .readings import MemoryReadings
from .scopes import Scope

logger = logging.getLogger(__name__)

MAX_WORKER_ID_BYTES = 256
#: Most bytes a worker may report as its RSS: 1 PiB, far above any host's memory yet
#: far below 2**64, so sums of readings always fit the contract's uint64 fields. (Not
#: a multiple of this host's memory: a worker in another cgroup may see more.)
MAX_RSS = 1 << 50
MAX_NTHREADS = 65536
MAX_MEMORY_LIMIT_TEXT = 64
MAX_RESUME_SECRET_BYTES = 256
#: An RssWatch goes out again only when a line moved by more than this fraction of
#: the limit (values put or spilled move the lines, in RSS terms, at every tick).
WATCH_SLACK = 0.01


def check_rss(value: int, what: str) -> None:
    """Refuse an RSS no process can have: it would poison every reading summed from it."""
    if value > MAX_RSS:
        raise InvalidArgument(
            f"{what} is {value} bytes, more than the {MAX_RSS} (1 PiB) any process can "
            "have; report the worker's real RSS in bytes, or leave it unset"
        )


class Supervisor(Protocol):
    """What the control plane asks of the nanny (``nanny.Nanny``)."""

    def slot_secret(self, worker_id: str) -> str | None:
        """The resume secret of the worker started as ``worker_id``; None if none was."""
        ...

    async def terminate(self, worker_id: str, reason: str, heard: asyncio.Event) -> None: ...


class Evaluator(Protocol):
    """What the control plane asks of the monitor (``monitor.Monitor``)."""

    def attached(self, scope: Scope) -> None:
        """A worker that reports its own RSS attached: work out its lines."""
        ...

    def reported(self, scope: Scope) -> None:
        """A heartbeat brought the worker's RSS: decide now if it crossed a line."""
        ...


@dataclass(frozen=True)
class Command:
    """A command on its way to a worker; ``service.py`` encodes it."""

    id: int
    type: str  # "pause" | "resume" | "terminate" | "trim"
    reason: str
    readings: MemoryReadings | None
    memory_limit: int | None


@dataclass(frozen=True)
class Watch:
    """An ``RssWatch`` on its way: report RSS above each of ``above``, or below
    ``below``, at once."""

    above: tuple[int, ...]
    below: int | None


@dataclass
class Sent:
    """A command sent and not yet answered."""

    type: str
    #: Set when the worker answers it, or its stream ends: it will hear no more.
    heard: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class Session:
    """One attached worker's stream."""

    session_id: str
    worker_id: str
    pid: int
    nthreads: int
    scope: Scope
    keys_kept: int
    #: The worker id's resume secret, sent back in the Session.
    resume_secret: str = ""
    #: The client it attached from (``edge.client_of``), for per-client limits.
    client: str = ""
    #: Commands and watches to send; None ends the stream (the service is shutting down).
    outbox: asyncio.Queue[Command | Watch | None] = field(default_factory=asyncio.Queue)
    #: Who holds this worker paused: "own" (its scope) and/or "service".
    paused_by: set[str] = field(default_factory=set)
    #: Commands sent and not yet answered, by id.
    pending: dict[int, Sent] = field(default_factory=dict)
    #: The hello's process's start time, if this service can see that process.
    started: float | None = None
    #: The worker reports its own RSS: it lives where its PID means nothing here.
    reports_rss: bool = False
    #: Silent past the heartbeat timeout, and kept because its process is alive.
    silent: bool = False
    #: Reads the RSS of the hello's process, while the worker does not report its own.
    rss: ProcessRss | None = None
    #: The last RssWatch sent.
    watched: Watch | None = None


def process_started(pid: int) -> float | None:
    """When process ``pid`` started, if this service can see it alive; else None."""
    if pid <= 0:
        return None
    try:
        process = psutil.Process(pid)
        return None if process.status() == psutil.STATUS_ZOMBIE else process.create_time()
    except psutil.Error:
        return None


class ProcessRss:
    """One process's RSS, read as often as the monitor ticks, from that process only.

    On Linux, ``/proc/PID/statm`` stays open and each reading is one ``pread``: no
    path lookup and no psutil object per reading. The open file belongs to the
    process it was opened for: once that one is gone its reads fail, whoever gets
    the PID next. Elsewhere psutil reads it, checking the start time every time.
    """

    PROC = os.path.isdir("/proc/self")

    def __init__(self, fd: int | None, process: psutil.Process | None):
        self._fd, self._process = fd, process

    @classmethod
    def open(cls, pid: int, started: float) -> ProcessRss | None:
        """A reader for process ``pid``, if it is the one that started at ``started``."""
        if not cls.PROC:
            try:
                process = psutil.Process(pid)
                same = process.create_time() == started
            except psutil.Error:
                return None
            return cls(None, process) if same else None
        try:
            fd = os.open(f"/proc/{pid}/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        # Checked after opening: the file is this process's, not one that had the PID.
        if process_started(pid) != started:
            os.close(fd)
            return None
        return cls(fd, None)

    def read(self) -> int | None:
        """RSS in bytes; None once the process is gone (a zombie reads 0)."""
        if self._fd is None:
            assert self._process is not None
            try:  # is_running() compares the start time: False for a reused PID
                running = self._process.is_running()
                return int(self._process.memory_info().rss) if running else None
            except psutil.Error:
                return None
        try:
            return int(os.pread(self._fd, 256, 0).split()[1]) * mmap.PAGESIZE
        except (OSError, IndexError, ValueError):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def alive_without_heartbeats(pid: int, started: float | None, reports_rss: bool) -> bool:
    """Whether a silent worker is still known alive: its process, seen here at hello,
    is still running (not a zombie, not another process that reused the PID).

    Heartbeats decide only for workers the service cannot see: a PID not visible or
    not alive here, or a worker that reports its own RSS (another PID namespace,
    where its PID names some other process here).
    """
    return not reports_rss and started is not None and process_started(pid) == started


def _moved(old: Watch, new: Watch, slack: float) -> bool:
    """Whether a line appeared, went, or moved by more than ``slack`` bytes."""
    if len(old.above) != len(new.above) or (old.below is None) != (new.below is None):
        return True
    pairs = [*zip(old.above, new.above, strict=True), (old.below or 0, new.below or 0)]
    return any(abs(a - b) > slack for a, b in pairs)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Identities:
    """Digests of the resume secrets handed out, by worker id; with a ``path`` (under
    ``persist``), kept in a file only the daemon's user may read."""

    def __init__(self, path: Path | None):
        self.path = path
        self.digests: dict[str, str] = {}
        if path is not None and path.exists():
            try:
                loaded = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                logger.warning("Cannot read %s (%s): kept workers need new ids", path, exc)
            else:
                self.digests = {str(k): str(v) for k, v in dict(loaded).items()}

    def matches(self, worker_id: str, secret: str) -> bool:
        digest = self.digests.get(worker_id)
        return digest is not None and hmac.compare_digest(_digest(secret), digest)

    def set(self, worker_id: str, secret: str) -> None:
        if self.digests.get(worker_id) != _digest(secret):
            self.digests[worker_id] = _digest(secret)
            self._save()

    def forget(self, worker_id: str) -> None:
        if self.digests.pop(worker_id, None) is not None:
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        partial = self.path.with_suffix(".partial")
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(self.digests, fh)
        partial.replace(self.path)


class ControlPlane:
    """Attached workers, by worker id, and the commands for them."""

    def __init__(
        self,
        core: MemoryService,
        *,
        heartbeat_interval: float,
        heartbeat_timeout: float,
        retention: float,
        max_sessions_per_client: int = 64,
        supervisor: Supervisor | None = None,
        identity_file: Path | None = None,
    ):
        self.core = core
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.retention = retention
        self.max_sessions_per_client = max_sessions_per_client
        self.supervisor = supervisor
        #: The monitor, once the daemon has started it.
        self.evaluator: Evaluator | None = None
        self.identities = Identities(identity_file)
        self.attached: dict[str, Session] = {}
        self._sessions_by_client: Counter[str] = Counter()
        self._command_ids = itertools.count(1)

    # --- sessions -------------------------------------------------------------------------
    def _prove(self, worker_id: str, secret: str) -> tuple[str, bool]:
        """The id's resume secret to hand back, and whether the worker is supervised;
        FailedPrecondition if ``secret`` does not prove the worker owns the id."""
        slot_secret = self.supervisor.slot_secret(worker_id) if self.supervisor else None
        if slot_secret is not None:
            if not hmac.compare_digest(secret.encode(), slot_secret.encode()):
                raise FailedPrecondition(
                    f"worker id {worker_id!r} belongs to a worker this daemon started "
                    f"(nanny mode); only that process may attach as it (it finds its "
                    f"secret in {RESUME_SECRET_VARIABLE}); choose another worker id"
                )
            self.identities.set(worker_id, slot_secret)
            return slot_secret, True
        if secret and self.identities.matches(worker_id, secret):
            return secret, False
        kept = self.core.scopes.get(worker_id)
        if kept is None or not kept.sizes.keys:  # nothing kept for it: the id is free
            fresh = secrets.token_urlsafe(24)
            self.identities.set(worker_id, fresh)
            return fresh, False
        raise FailedPrecondition(
            f"worker id {worker_id!r} attached before and its {kept.sizes.keys} values "
            "are kept for it: attach "
            f"with {'the right' if secret else 'its'} resume secret (Hello.resume_secret, "
            "returned by its first attach; WorkerSession.resume_secret in Python), or "
            "use another worker id. Without the secret the id is free again once its "
            f"data is released, {self.retention:g} s after it detached (control.retention)"
        )

    async def attach(
        self,
        worker_id: str,
        pid: int,
        nthreads: int,
        memory_limit: str,
        *,
        resume_secret: str = "",
        client: str = "",
        report_rss: bool = False,
    ) -> Session:
        """Open a session for a hello; errors say what to change."""
        size = len(worker_id.encode("utf-8"))
        if not 0 < size <= MAX_WORKER_ID_BYTES:
            raise InvalidArgument(
                f"worker id must be 1 to {MAX_WORKER_ID_BYTES} bytes of UTF-8, not {size}"
            )
        if worker_id == SERVICE_SCOPE:
            raise InvalidArgument(f"worker id {SERVICE_SCOPE!r} is reserved; choose another")
        if worker_id in self.attached:
            raise FailedPrecondition(
                f"worker id {worker_id!r} is already attached (pid "
                f"{self.attached[worker_id].pid}); give every worker a unique id"
            )
        if nthreads > MAX_NTHREADS:
            raise InvalidArgument(
                f"Hello.nthreads is {nthreads}; give 1 to {MAX_NTHREADS} (0 means 1)"
            )
        nthreads = max(nthreads, 1)
        if len(resume_secret.encode()) > MAX_RESUME_SECRET_BYTES:
            raise InvalidArgument(
                f"Hello.resume_secret is {len(resume_secret.encode())} bytes; a resume "
                f"secret is at most {MAX_RESUME_SECRET_BYTES}: send the one the service "
                "returned"
            )
        if self._sessions_by_client[client] >= self.max_sessions_per_client:
            raise ResourceExhausted(
                f"this client has {self._sessions_by_client[client]} Attach sessions open, "
                "the most one client may have (limits.max-sessions-per-client); attach "
                "further workers from their own clients"
            )
        if len(memory_limit) > MAX_MEMORY_LIMIT_TEXT:
            raise InvalidArgument(
                f"Hello.memory_limit is {len(memory_limit)} characters long; give at most "
                f"{MAX_MEMORY_LIMIT_TEXT}, e.g. auto, 4 GiB, 0.5 or none"
            )
        try:
            limit = resolve_memory_limit(
                memory_limit or "auto",
                total_memory=self.core.settings.total_memory,
                nthreads=nthreads,
            )
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        secret, supervised = self._prove(worker_id, resume_secret)
        session_id = secrets.token_urlsafe(18)
        scope, kept = await self.core.open_worker_scope(worker_id, limit, session_id)
        if worker_id in self.attached:  # raced with another hello while awaiting
            raise FailedPrecondition(f"worker id {worker_id!r} is already attached")
        # Attached last: each assignment publishes the scope's view, and no reader
        # should see the new session with the old one's memo (say, terminating).
        scope.memo = ScopeMemo()  # a new session starts running
        scope.pid, scope.reported_rss, scope.measured_rss = pid, None, None
        scope.supervised = supervised
        scope.attached, scope.detached_since = True, None
        session = Session(
            session_id,
            worker_id,
            pid,
            nthreads,
            scope,
            scope.sizes.keys if kept else 0,
            resume_secret=secret,
            client=client,
        )
        self._sessions_by_client[client] += 1
        session.reports_rss = report_rss
        session.started = process_started(pid)
        if not report_rss and session.started is not None:
            session.rss = ProcessRss.open(pid, session.started)
            if session.rss is not None:
                scope.measured_rss = session.rss.read()
        self.attached[worker_id] = session
        if report_rss and self.evaluator is not None:
            self.evaluator.attached(scope)
        if self.service_paused:
            session.paused_by.add("service")
            self._send(session, "pause", "the service scope is paused", None)
        logger.info(
            "Worker %r attached (pid %d, %s, limit %s%s)",
            worker_id,
            pid,
            "supervised" if scope.supervised else "not supervised",
            limit,
            f", {session.keys_kept} values kept" if kept else "",
        )
        return session

    def heartbeat_interval_of(self, session: Session) -> float:
        """How often a worker is to send heartbeats: ``heartbeat-interval`` when they
        are how the service knows it is alive (and, reporting, how large); a worker
        read by PID, whose process is watched here instead, only often enough to
        stay clear of the heartbeat timeout: 64 such workers every second cost the
        idle daemon 4% of a core, most of it in gRPC, for nothing."""
        if session.rss is None:
            return self.heartbeat_interval
        return max(self.heartbeat_interval, self.heartbeat_timeout / 2)

    def heartbeat(self, session: Session, rss: int | None) -> None:
        """Note a heartbeat; an impossible RSS is refused and changes nothing. A
        reported RSS that crosses a line is decided on now."""
        if rss is not None:
            check_rss(rss, "Heartbeat.rss")
        session.scope.reported_rss = rss
        if session.silent:
            session.silent = False
            logger.info("Worker %r sends heartbeats again", session.worker_id)
        if rss is None:
            return
        if not session.reports_rss:  # a client that did not say so in its hello
            session.reports_rss = True
            self._close_rss(session)
            session.scope.measured_rss = None
            if self.evaluator is not None:
                self.evaluator.attached(session.scope)
        if self.evaluator is not None:
            self.evaluator.reported(session.scope)

    def measure(self) -> None:
        """Read the RSS of every worker measured by PID, and publish it on its scope
        for the tick, Status and metrics (the monitor, once per tick)."""
        for session in self.attached.values():
            if session.rss is not None:
                session.scope.measured_rss = session.rss.read() or 0

    @staticmethod
    def _close_rss(session: Session) -> None:
        if session.rss is not None:
            session.rss.close()
            session.rss = None

    def reports_rss(self, scope: Scope) -> bool:
        """Whether the scope's worker is attached and reports its own RSS."""
        session = self.attached.get(scope.name)
        return session is not None and session.reports_rss

    def watch(self, scope: Scope, lines: Lines) -> None:
        """Tell a worker reporting its RSS where ``lines`` (process memory) are in
        terms of its RSS, if they moved since it was last told."""
        session = self.attached.get(scope.name)
        if session is None or not session.reports_rss:
            return
        managed = scope.sizes.managed
        above = tuple(max(line - managed, 0) for line in lines.above)
        below = None if lines.below is None or lines.below <= managed else lines.below - managed
        watch = Watch(above, below)
        slack = WATCH_SLACK * (scope.memory_limit or 0)
        if session.watched is None or _moved(session.watched, watch, slack):
            session.watched = watch
            session.outbox.put_nowait(watch)

    def silence(self, session: Session, silent_for: float) -> str | None:
        """Why to detach a worker not heard from for ``silent_for`` seconds, or None to
        keep it (not silent long enough, or its process is alive here)."""
        if silent_for < self.heartbeat_timeout:
            return None
        if alive_without_heartbeats(session.pid, session.started, session.reports_rss):
            if not session.silent:
                session.silent = True
                logger.warning(
                    "Worker %r sent no heartbeat for %.0f s, but its process (pid %d) is "
                    "alive: it stays attached",
                    session.worker_id,
                    silent_for,
                    session.pid,
                )
            return None
        why = (
            "it reports its own RSS, so its process is not watched here"
            if session.reports_rss
            else f"pid {session.pid} is not a live process this service can see"
        )
        return f"no heartbeat for {silent_for:.0f} s; {why}"

    def detach(self, session: Session, why: str) -> None:
        """The stream ended: keep the scope and its data for ``retention``."""
        for sent in session.pending.values():
            sent.heard.set()  # nothing more will reach the worker on this stream
        self._close_rss(session)
        if self.attached.get(session.worker_id) is not session:
            return
        self._sessions_by_client[session.client] -= 1
        if self._sessions_by_client[session.client] <= 0:
            del self._sessions_by_client[session.client]
        del self.attached[session.worker_id]
        scope = session.scope
        scope.attached, scope.detached_since = False, time.monotonic()
        scope.reported_rss = scope.measured_rss = None
        logger.info(
            "Worker %r detached (%s); its %d values are kept for %.0f s",
            session.worker_id,
            why,
            scope.sizes.keys,
            self.retention,
        )

    async def release_expired(self, now: float) -> None:
        """Release detached scopes whose retention has passed."""
        for scope in self.core.scope_list:
            since = scope.detached_since
            if since is not None and not scope.attached and now - since >= self.retention:
                logger.info(
                    "Releasing worker %r: detached for %.0f s, %d values dropped",
                    scope.name,
                    now - since,
                    scope.sizes.keys,
                )
                await self.core.release_scope(scope)
                self.identities.forget(scope.name)

    # --- commands ---------------------------------------------------------------------------
    @property
    def service_paused(self) -> bool:
        return self.core.service_scope.memo.paused

    def _send(
        self, session: Session, kind: str, reason: str, readings: MemoryReadings | None
    ) -> Sent:
        command = Command(
            next(self._command_ids), kind, reason, readings, session.scope.memory_limit
        )
        session.outbox.put_nowait(command)
        sent = session.pending[command.id] = Sent(kind)
        return sent

    def answered(self, session: Session, command_id: int) -> str | None:
        """The type of the command a worker answered, or None if it was not ours."""
        sent = session.pending.pop(command_id, None)
        if sent is None:
            return None
        sent.heard.set()
        return sent.type

    def _targets(self, scope_name: str) -> list[Session]:
        if scope_name == SERVICE_SCOPE:
            return list(self.attached.values())
        session = self.attached.get(scope_name)
        return [session] if session else []

    def pause(self, scope_name: str, reason: str, readings: MemoryReadings) -> None:
        """PAUSE the scope's worker (service scope: every worker) unless already paused."""
        source = "service" if scope_name == SERVICE_SCOPE else "own"
        for session in self._targets(scope_name):
            if not session.paused_by:
                self._send(session, "pause", reason, readings)
            session.paused_by.add(source)

    def resume(self, scope_name: str, reason: str, readings: MemoryReadings) -> None:
        """RESUME once nothing holds the worker paused any more."""
        source = "service" if scope_name == SERVICE_SCOPE else "own"
        for session in self._targets(scope_name):
            if source in session.paused_by:
                session.paused_by.discard(source)
                if not session.paused_by:
                    self._send(session, "resume", reason, readings)

    async def terminate(self, scope_name: str, reason: str, readings: MemoryReadings) -> None:
        """TERMINATE the worker; a supervised one is also killed and restarted, once it
        has heard the command (or had ``nanny.terminate-notice`` to)."""
        session = self.attached.get(scope_name)
        if session is None:
            return
        sent = self._send(session, "terminate", reason, readings)
        if session.scope.supervised and self.supervisor is not None:
            await self.supervisor.terminate(scope_name, reason, sent.heard)

    def shutdown(self) -> None:
        """End every Attach stream, so draining does not wait on them."""
        for session in self.attached.values():
            session.outbox.put_nowait(None)

    def trim_all(self) -> int:
        """Send TRIM to every attached worker; how many were asked."""
        sessions = list(self.attached.values())
        for session in sessions:
            self._send(session, "trim", "asked by a Trim call", None)
        return len(sessions)
