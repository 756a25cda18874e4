"""The worker side of the ``Attach`` control stream: ``Client.attach()`` returns a
``WorkerSession``.

A worker says hello (its id, pid, nthreads and memory limit) and gets a session back;
from then on the data calls of the client it attached through (Put, Get, ...) carry
the session id as ``memctl-session`` call metadata, so that its values belong to its
own scope. A background thread holds the stream: it receives PAUSE, RESUME,
TERMINATE and TRIM, runs the callbacks registered with ``on()``, answers each
command with a ``CommandResult``, and hands it to ``commands()`` / ``wait_for()``.
Heartbeats go out every ``heartbeat_interval`` seconds from gRPC's request thread,
so a slow callback does not get the worker marked detached. With ``report_rss=True``
they carry the worker's RSS, the first at once; that thread also samples the RSS
every ``RSS_SAMPLE_INTERVAL`` and sends a heartbeat as soon as it crosses one of the
lines the service watches for (``RssWatch``: where a threshold is crossed, with the
values the service holds for the worker counted in), so that PAUSE comes a sample
and a round trip after the crossing instead of up to a heartbeat interval later.

When the stream breaks (the daemon restarted, the connection dropped) the session
attaches again with the same hello, waiting 0.1 s, then twice as long each time, up
to 5 s. Until it is back (``connected``), data calls may fail: ``ServiceUnavailable``
while the daemon is down, ``FailedPrecondition`` from a restarted daemon that does
not know the old session id.

One session per ``Client``: the session id is the client's call metadata. To attach
several workers from one process, give each its own ``Client``.

What it does not do: it never pauses, stops or kills the worker. PAUSE and
TERMINATE change ``state`` and call your callbacks; stopping work or exiting is up
to you. The one command it carries out itself is TRIM (``malloc_trim(0)`` through
``memctl.trim``, after the callbacks). It works with the blocking ``Client`` only;
there is no asyncio version yet.

>>> with Client() as client, client.attach("w1", memory_limit="2 GiB") as session:
...     session.on("pause", lambda command: print("paused:", command.reason))
...     client.put("x", b"data")  # stored in the scope of worker "w1"
"""

from __future__ import annotations

import bisect
import logging
import mmap
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, overload

import grpc
import psutil

from .errors import MemctlError, ServiceUnavailable, status_of, translate
from .protocol import SESSION_METADATA_KEY
from .results import enum_name, readings_dict, thresholds_dict
from .trim import trim
from .v1 import memctl_pb2 as pb

if TYPE_CHECKING:
    from .client import Client
    from .v1 import memctl_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

CommandName = Literal["pause", "resume", "terminate", "trim"]
State = Literal["running", "paused", "terminating"]
#: The command types the service sends; ``on()`` also takes ``"attach"``.
COMMAND_TYPES: tuple[CommandName, ...] = ("pause", "resume", "terminate", "trim")
_STATE_AFTER: dict[str, State] = {
    "pause": "paused",
    "resume": "running",
    "terminate": "terminating",
}

#: Re-attach waits this long after a broken stream, doubling up to MAX_BACKOFF.
INITIAL_BACKOFF = 0.1
MAX_BACKOFF = 5.0
#: Used when the service's Session leaves heartbeat_interval_seconds unset.
DEFAULT_HEARTBEAT_INTERVAL = 1.0
#: With ``report_rss``, how often the RSS is compared with the service's lines.
RSS_SAMPLE_INTERVAL = 0.05
#: Seconds ``close()`` waits for the service to end the stream before cancelling it.
CLOSE_TIMEOUT = 5.0
#: Commands nobody has taken with ``commands()`` / ``wait_for()`` are kept up to
#: this many; older ones are dropped (callbacks saw them anyway).
MAX_PENDING_COMMANDS = 1000

Metadata = tuple[tuple[str, str], ...]


@dataclass
class _Watch:
    """The service's RssWatch, and where the RSS stood against it at the last sample."""

    above: tuple[int, ...]
    below: int | None
    #: How many of ``above`` the RSS was over.
    level: int = 0
    #: Whether it was under ``below``.
    under: bool = False

    @classmethod
    def from_pb(cls, watch: pb.RssWatch) -> _Watch:
        return cls(tuple(watch.above), watch.below if watch.HasField("below") else None)

    def report(self, rss: int) -> bool:
        """Whether ``rss``, the new sample, is over more lines than the last one was,
        or newly under ``below``: the service should hear it now."""
        level = bisect.bisect_left(self.above, rss)  # lines strictly under rss
        under = self.below is not None and rss < self.below
        crossed = level > self.level or (under and not self.under)
        self.level, self.under = level, under
        return crossed


class _OwnRss:
    """This process's RSS, read every RSS_SAMPLE_INTERVAL: one ``pread`` of
    ``/proc/self/statm`` held open (a tenth of psutil's cost), else psutil."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._process: psutil.Process | None = None
        try:
            self._fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self._process = psutil.Process()

    def read(self) -> int | None:
        try:
            if self._process is not None:
                return int(self._process.memory_info().rss)
            assert self._fd is not None
            return int(os.pread(self._fd, 256, 0).split()[1]) * mmap.PAGESIZE
        except (OSError, IndexError, ValueError, psutil.Error):
            return None

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


# What the request stream's queue carries: a message to send, a heartbeat interval
# (float: start or change heartbeats), new lines to watch, or None (end the stream).
_Item = pb.AttachRequest | float | _Watch | None


@dataclass(frozen=True)
class Command:
    """A command from the service, with the reason and the readings behind it."""

    id: int
    #: "pause", "resume", "terminate" or "trim".
    type: str
    reason: str
    #: The scope's readings in bytes: process, managed, unmanaged, unmanaged_recent, spilled.
    readings: dict[str, int]
    #: The scope's limit in bytes; None for no limit.
    memory_limit: int | None
    #: ``time.monotonic()`` when it arrived.
    received_at: float

    @classmethod
    def from_pb(cls, command: pb.Command, received_at: float | None = None) -> Command:
        return cls(
            id=command.command_id,
            type=enum_name(pb.CommandType, command.type, "COMMAND_TYPE_"),
            reason=command.reason,
            readings=readings_dict(command.readings),
            memory_limit=command.memory_limit or None,
            received_at=time.monotonic() if received_at is None else received_at,
        )


@dataclass(frozen=True)
class SessionInfo:
    """What the service answered to the hello; given to ``on("attach", fn)`` callbacks."""

    session_id: str
    #: Bytes; None for no limit.
    memory_limit: int | None
    #: Fractions of the limit; False for a threshold turned off.
    thresholds: dict[str, float | Literal[False]]
    heartbeat_interval: float
    #: Values the scope still held from an earlier session of this worker id.
    keys_kept: int
    #: Proves this worker id on a later attach (``Client.attach(resume_secret=)``).
    resume_secret: str = ""
    #: Whether the service started this worker (nanny mode) and may signal it.
    supervised: bool = False

    @classmethod
    def from_pb(cls, session: pb.Session) -> SessionInfo:
        return cls(
            session_id=session.session_id,
            memory_limit=session.memory_limit or None,
            thresholds=thresholds_dict(session.thresholds),
            heartbeat_interval=session.heartbeat_interval_seconds or DEFAULT_HEARTBEAT_INTERVAL,
            keys_kept=session.keys_kept,
            resume_secret=session.resume_secret,
            supervised=session.supervised,
        )


class _ChannelClosed(Exception):
    """The client's channel was closed under the session; nothing left to retry."""


def _callable_name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


class WorkerSession:
    """A worker attached to a memctl daemon; made by ``Client.attach()``.

    Thread-safe for the common use: callbacks run on the session's background thread,
    ``state`` and the session fields can be read from any thread. Close it (or use it
    as a context manager) to end the stream; the worker's scope and its values stay
    in the daemon (for the daemon's ``control.retention``), and attaching again with
    the same ``worker_id`` and its ``resume_secret`` gets them back.
    """

    def __init__(
        self,
        client: Client,
        stub: pb_grpc.MemctlServiceStub,
        hello: pb.Hello,
        *,
        report_rss: bool = False,
        timeout: float = 10.0,
    ) -> None:
        """Attach now; raises the client's errors if the service refuses the hello, or
        ``ServiceUnavailable`` if it does not answer within ``timeout`` seconds."""
        self.worker_id: str = hello.worker_id
        self._client = client
        self._address = client.address
        self._stub = stub
        self._hello = hello
        self._report_rss = report_rss
        self._timeout = timeout
        self._saved_metadata: Metadata = client.metadata

        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._closed = False
        self._connected = False
        self._state: State = "running"
        self._reattached = 0
        self._callbacks: dict[str, list[Callable[[Any], object]]] = {
            name: [] for name in (*COMMAND_TYPES, "attach")
        }
        self._pending: deque[Command] = deque(maxlen=MAX_PENDING_COMMANDS)
        self._call: Any = None  # the current Attach call (a grpc rendezvous)
        self._opening: Any = None  # a call still waiting for its Session
        self._requests: queue.Queue[_Item] | None = None

        try:
            call, requests, session = self._open(wait_for_ready=False)
        except _ChannelClosed:
            raise ValueError("cannot attach through a closed client") from None
        self._info = SessionInfo.from_pb(session)
        self._install(call, requests, self._info, reattach=False)
        self._thread = threading.Thread(
            target=self._run, name=f"memctl-worker-{hello.worker_id}", daemon=True
        )
        self._thread.start()

    # -- what callers read -------------------------------------------------------

    @property
    def state(self) -> State:
        """The worker's state: "running", "paused" (after PAUSE) or "terminating"
        (after TERMINATE). A new session (after a re-attach) starts "running"; the
        service sends PAUSE again if memory is still high."""
        return self._state

    @property
    def info(self) -> SessionInfo:
        """The current session as the service described it."""
        return self._info

    @property
    def session_id(self) -> str:
        return self._info.session_id

    @property
    def memory_limit(self) -> int | None:
        """The worker scope's effective limit in bytes; None for no limit."""
        return self._info.memory_limit

    @property
    def thresholds(self) -> dict[str, float | Literal[False]]:
        return self._info.thresholds

    @property
    def keys_kept(self) -> int:
        """Values the scope still held from an earlier session of this worker id."""
        return self._info.keys_kept

    @property
    def heartbeat_interval(self) -> float:
        return self._info.heartbeat_interval

    @property
    def resume_secret(self) -> str:
        """The secret that gets this worker id's kept data back after this process is
        gone: pass it to ``Client.attach(resume_secret=...)``. Re-attaches of this
        session use it by themselves."""
        return self._info.resume_secret

    @property
    def supervised(self) -> bool:
        """Whether the daemon started this worker (nanny mode) and may signal it."""
        return self._info.supervised

    @property
    def reattached(self) -> int:
        """How many times the session attached again after a broken stream."""
        return self._reattached

    @property
    def connected(self) -> bool:
        """True while the stream is up; False while re-attaching and after close()."""
        return self._connected

    @property
    def closed(self) -> bool:
        return self._closed

    # -- callbacks, iteration, waiting -------------------------------------------

    @overload
    def on(self, event: Literal["attach"], fn: Callable[[SessionInfo], object]) -> None: ...

    @overload
    def on(self, event: CommandName, fn: Callable[[Command], object]) -> None: ...

    def on(self, event: str, fn: Callable[[Any], object]) -> None:
        """Call ``fn(command)`` for every command of type ``event`` ("pause", "resume",
        "terminate", "trim"), or ``fn(session_info)`` after every re-attach
        (``event="attach"``; not for the first attach, which is done when
        ``attach()`` returns). Callbacks run on the session's thread, in the order
        registered, before the command is answered; an exception is logged and makes
        the result ``ok=False``, nothing more. Because they run on that thread,
        ``sys.exit()`` in a callback cannot exit the process: use ``os._exit()`` or
        hand the command to the main thread (``commands()``, ``wait_for()``)."""
        if event not in self._callbacks:
            raise ValueError(f"unknown event {event!r}; use one of {', '.join(self._callbacks)}")
        with self._cond:
            self._callbacks[event].append(fn)

    def commands(self, timeout: float | None = None) -> Iterator[Command]:
        """Commands in the order they arrived, each once its callbacks have run and its
        result is on its way. Blocks for the next one; stops when the session is
        closed, or when ``timeout`` seconds pass without a command."""
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._pending or self._closed, timeout):
                    return
                if not self._pending:  # closed
                    return
                command = self._pending.popleft()
            yield command

    def wait_for(self, type: str, timeout: float) -> Command:
        """The next command of ``type`` (taken from the same queue as ``commands()``;
        other types stay queued). Raises ``TimeoutError`` if none arrives within
        ``timeout`` seconds, or at once if the session is closed."""
        if type not in COMMAND_TYPES:
            raise ValueError(f"unknown command type {type!r}; use one of {COMMAND_TYPES}")
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for command in self._pending:
                    if command.type == type:
                        self._pending.remove(command)
                        return command
                if self._closed:
                    raise TimeoutError(f"the session was closed before a {type} command came")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"no {type} command within {timeout} s")
                self._cond.wait(remaining)

    # -- closing -----------------------------------------------------------------

    def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """End the stream (the service sees the request stream end), stop re-attaching,
        and give the client its old metadata back. Waits up to ``timeout`` seconds
        for the service to end its side, then cancels the call. Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._connected = False
            requests, call, opening = self._requests, self._call, self._opening
            self._client.metadata = self._saved_metadata
            self._cond.notify_all()
        self._stop.set()
        if opening is not None:
            opening.cancel()
        if requests is not None:
            requests.put(None)  # half-close: the service reads end-of-stream
        if threading.current_thread() is self._thread:  # close() from a callback
            call.cancel()
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning(
                "memctl at %s did not end the control stream of worker %r within %s s; "
                "cancelling it",
                self._address,
                self.worker_id,
                timeout,
            )
            call.cancel()
            self._thread.join(timeout)

    def __enter__(self) -> WorkerSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"<WorkerSession {self.worker_id!r} at {self._address} "
            f"session={self.session_id!r} state={self._state}"
            f"{' closed' if self._closed else ''}>"
        )

    # -- the stream --------------------------------------------------------------

    def _open(self, *, wait_for_ready: bool) -> tuple[Any, queue.Queue[_Item], pb.Session]:
        """Start an Attach call, send the hello and wait for the Session."""
        requests: queue.Queue[_Item] = queue.Queue()
        # The client's current metadata (its token may have changed with a daemon
        # restart), without the session this call is about to replace.
        metadata = tuple(i for i in self._client.metadata if i[0] != SESSION_METADATA_KEY)
        try:
            call = self._stub.Attach(
                self._request_stream(requests), metadata=metadata, wait_for_ready=wait_for_ready
            )
        except ValueError as exc:  # "Cannot invoke RPC on closed channel!"
            raise _ChannelClosed(str(exc)) from exc
        with self._cond:
            self._opening = call
            if self._closed:
                call.cancel()
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            call.cancel()

        timer = threading.Timer(self._timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            first = next(call)
        except StopIteration:
            requests.put(None)
            raise MemctlError(
                f"memctl at {self._address} ended the control stream without a session"
            ) from None
        except grpc.RpcError as exc:
            requests.put(None)
            raise self._refused(exc, timed_out=expired.is_set()) from None
        finally:
            timer.cancel()
            with self._cond:
                self._opening = None
        if first.WhichOneof("kind") != "session":
            requests.put(None)
            call.cancel()
            raise MemctlError(
                f"memctl at {self._address} sent {first.WhichOneof('kind')} before the session"
            )
        return call, requests, first.session

    def _refused(self, exc: grpc.RpcError, *, timed_out: bool) -> Exception:
        """Why an Attach got no session (a function: a local naming the exception
        would tie it to its own traceback in a cycle)."""
        error = translate(exc, self._address)  # which also frees the call: errors.status_of
        if timed_out:
            return ServiceUnavailable(
                f"memctl at {self._address} did not answer Attach within {self._timeout} s",
                grpc.StatusCode.DEADLINE_EXCEEDED,
            )
        return error

    def _request_stream(self, requests: queue.Queue[_Item]) -> Iterator[pb.AttachRequest]:
        """The request side, consumed by gRPC's own thread: the hello, then whatever is
        queued, a heartbeat whenever one is due, and (reporting RSS) one as soon as the
        RSS crosses a line of the service's RssWatch."""
        yield pb.AttachRequest(hello=self._hello)
        interval: float | None = None  # no heartbeats before the Session says how often
        due = 0.0
        watch: _Watch | None = None
        own = _OwnRss() if self._report_rss else None
        try:
            while True:
                wait = None if interval is None else max(due - time.monotonic(), 0.0)
                if watch is not None:
                    wait = RSS_SAMPLE_INTERVAL if wait is None else min(wait, RSS_SAMPLE_INTERVAL)
                try:
                    item = requests.get(timeout=wait)
                except queue.Empty:
                    rss = own.read() if own is not None else None
                    crossed = watch is not None and rss is not None and watch.report(rss)
                    if interval is not None and time.monotonic() >= due:
                        due = max(due + interval, time.monotonic())
                    elif not crossed:
                        continue
                    yield self._heartbeat(rss)
                    continue
                if item is None:
                    return
                if isinstance(item, float):
                    # A worker reporting its RSS reports it at once: until then the
                    # service knows nothing of its memory.
                    interval, due = item, time.monotonic() + (0.0 if own else item)
                    continue
                if isinstance(item, _Watch):
                    watch = item
                    continue
                yield item
        finally:
            if own is not None:
                own.close()

    @staticmethod
    def _heartbeat(rss: int | None) -> pb.AttachRequest:
        return pb.AttachRequest(heartbeat=pb.Heartbeat(rss=rss))

    def _install(
        self, call: Any, requests: queue.Queue[_Item], info: SessionInfo, *, reattach: bool
    ) -> bool:
        """Make a freshly opened call the session's, unless close() came first."""
        with self._cond:
            if self._closed:
                requests.put(None)
                call.cancel()
                return False
            self._call, self._requests, self._info = call, requests, info
            # Re-attaches prove the id with the secret the service gave (a daemon
            # restarted without persist gives a new one).
            self._hello.resume_secret = info.resume_secret
            self._state = "running"
            self._connected = True
            if reattach:
                self._reattached += 1
            others = tuple(i for i in self._saved_metadata if i[0] != SESSION_METADATA_KEY)
            self._client.metadata = (*others, (SESSION_METADATA_KEY, info.session_id))
        requests.put(float(info.heartbeat_interval))  # start heartbeats
        return True

    def _run(self) -> None:
        """The session's thread: read commands; re-attach when the stream breaks."""
        try:
            while True:
                with self._cond:
                    current = self._call
                why = self._read(current)
                with self._cond:
                    self._connected = False
                    requests, call, closed = self._requests, self._call, self._closed
                if requests is not None:
                    requests.put(None)
                if closed:
                    return
                call.cancel()
                logger.warning(
                    "memctl: control stream of worker %r to %s broke (%s); re-attaching",
                    self.worker_id,
                    self._address,
                    why,
                )
                if not self._reattach():
                    return
        finally:
            with self._cond:
                self._cond.notify_all()

    def _read(self, call: Any) -> str:
        """Handle what the service sends until the stream ends; why it ended."""
        try:
            for response in call:
                kind = response.WhichOneof("kind")
                if kind == "command":
                    self._handle(response.command)
                elif kind == "rss_watch":
                    with self._cond:
                        requests = self._requests
                    if requests is not None:
                        requests.put(_Watch.from_pb(response.rss_watch))
                elif kind == "session":  # not in the contract after the first; apply it
                    with self._cond:
                        requests = self._requests
                    if requests is not None:
                        info = SessionInfo.from_pb(response.session)
                        self._install(call, requests, info, reattach=False)
        except grpc.RpcError as exc:
            code, details = status_of(exc)
            return f"{code.name}: {details}"
        return "the service ended the stream"

    def _reattach(self) -> bool:
        """Attach again with the same hello until it works or close() is called."""
        delay = INITIAL_BACKOFF
        last_error = ""
        while not self._stop.wait(delay):
            try:
                call, requests, session = self._open(wait_for_ready=True)
            except _ChannelClosed:
                logger.warning(
                    "memctl: the client of worker %r was closed; the session ends",
                    self.worker_id,
                )
                with self._cond:
                    self._closed = True
                    self._client.metadata = self._saved_metadata
                return False
            except (MemctlError, KeyError) as exc:
                error = str(exc)
                log = logger.warning if error != last_error else logger.debug
                log("memctl: worker %r could not re-attach: %s", self.worker_id, error)
                last_error = error
                delay = min(delay * 2, MAX_BACKOFF)
                continue
            info = SessionInfo.from_pb(session)
            if not self._install(call, requests, info, reattach=True):
                return False
            logger.info(
                "memctl: worker %r re-attached to %s (session %s, %d values kept)",
                self.worker_id,
                self._address,
                info.session_id,
                info.keys_kept,
            )
            self._run_callbacks("attach", info)
            return True
        return False

    def _run_callbacks(self, event: str, argument: object) -> list[str]:
        """Call the callbacks of ``event``; what went wrong, for the result's detail."""
        with self._cond:
            callbacks = list(self._callbacks.get(event, ()))
        failures = []
        for fn in callbacks:
            try:
                fn(argument)
            except SystemExit as exc:  # sys.exit() here would only end this thread
                logger.error(
                    "memctl: %s callback %s of worker %r called sys.exit(), which cannot "
                    "exit the process from the session's thread; use os._exit() or tell "
                    "the main thread",
                    event,
                    _callable_name(fn),
                    self.worker_id,
                )
                failures.append(f"{_callable_name(fn)} called sys.exit({exc.code!r})")
            except Exception as exc:
                logger.exception(
                    "memctl: %s callback %s of worker %r failed",
                    event,
                    _callable_name(fn),
                    self.worker_id,
                )
                failures.append(f"{_callable_name(fn)} raised {exc!r}")
        return failures

    def _handle(self, message: pb.Command) -> None:
        """Apply one command: state, callbacks, trim; answer it; queue it for readers."""
        command = Command.from_pb(message)
        logger.info("memctl: worker %r got %s (%s)", self.worker_id, command.type, command.reason)
        with self._cond:
            self._state = _STATE_AFTER.get(command.type, self._state)
        failures = self._run_callbacks(command.type, command)
        result = pb.CommandResult(command_id=command.id, ok=True)
        if command.type == "trim":
            try:
                trimmed = trim()
            except Exception as exc:  # the answer must go out regardless
                logger.exception("memctl: trim failed")
                result.ok, result.detail = False, f"trim failed: {exc!r}"
            else:
                result.ok, result.detail = trimmed.supported, trimmed.detail
                result.rss_before, result.rss_after = trimmed.rss_before, trimmed.rss_after
        elif command.type not in COMMAND_TYPES:
            result.ok, result.detail = False, f"this client does not know {command.type}"
        if failures:
            result.ok = False
            result.detail = "; ".join(filter(None, [result.detail, *failures]))
        with self._cond:
            requests = self._requests
        if requests is not None:
            requests.put(pb.AttachRequest(result=result))
        with self._cond:
            self._pending.append(command)
            self._cond.notify_all()
