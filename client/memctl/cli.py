"""The ``memctl`` command line: run the daemon, and talk to it.

Every command that talks to a daemon takes ``--address`` and honours
``MEMCTL_ADDRESS``. Errors are one line on stderr: exit 1 for a failed operation
(missing key, service unreachable), 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import mmap
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live

from . import __version__
from ._base import DEFAULT_ADDRESS, DEFAULT_TIMEOUT
from .auth import runtime_directory, token_file_name
from .client import Client
from .dashboard import render_status, render_unreachable
from .errors import MemctlError
from .results import Status
from .sizes import format_bytes, parse_bytes

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def _client(args: argparse.Namespace, timeout: float | None = None) -> Client:
    return Client(
        args.address,
        timeout=args.timeout if timeout is None else timeout,
        token_file=args.token_file,
        scope=getattr(args, "scope_of_data", None),
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
    )


# --- serve and config ----------------------------------------------------------------
_SERVE_FLAGS = {
    "address": ("address", "--address"),
    "memory_limit": ("memory-limit", "--memory-limit"),
    "local_directory": ("local-directory", "--local-directory"),
    "worker": ("nanny.worker", "--worker"),
    "nworkers": ("nanny.nworkers", "--nworkers"),
    "auth": ("auth", "--auth"),
    "serve_token_file": ("token-file", "--token-file"),
    "insecure": ("insecure", "--insecure"),
}


def _load_config(args: argparse.Namespace) -> Any:
    """The effective configuration: file < environment < flags."""
    from memctl_server.config import ConfigError, load_config

    overrides: dict[str, object] = {}
    labels: dict[str, str] = {}
    for attr, (key, flag) in _SERVE_FLAGS.items():
        value = getattr(args, attr, None)
        if value is not None:
            overrides[key] = value
            labels[key] = flag
    for item in args.set or ():
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set takes KEY=VALUE, e.g. memory.target=0.5; got {item!r}")
        overrides[key.strip()] = value.strip()
        labels[key.strip()] = f"--set {key.strip()}"
    try:
        return load_config(config_file=args.config, overrides=overrides, override_labels=labels)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from memctl_server.daemon import run

    return run(_load_config(args).config)


def _token_path(config: Any) -> str:
    """Where the daemon of ``config`` writes its token (for ``memctl config``)."""
    if config.auth == "none":
        return "none (auth: none)"
    return str(runtime_directory(config.runtime_directory) / token_file_name(config.address))


def cmd_config(args: argparse.Namespace) -> int:
    loaded = _load_config(args)
    flat = loaded.as_flat_dict()
    token_path = _token_path(loaded.config)
    if args.json:
        print(json.dumps({k: {"value": v, "source": loaded.sources[k]} for k, v in flat.items()}))
        return 0
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}}  {shown:<24}  ({loaded.sources[key]})")
    print(f"# the daemon writes its token to {token_path}")
    return 0


# --- data commands ---------------------------------------------------------------------
def cmd_put(args: argparse.Namespace) -> int:
    metadata = args.metadata.encode() if args.metadata else b""
    with _client(args) as client:
        if args.file == "-":
            result = client.put(args.key, sys.stdin.buffer.read(), metadata)
        else:
            path = Path(args.file)
            try:
                with path.open("rb") as fh:
                    size = os.fstat(fh.fileno()).st_size
                    if size == 0:
                        result = client.put(args.key, b"", metadata)
                    else:
                        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                            result = client.put(args.key, memoryview(mapped), metadata)
            except OSError as exc:
                raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    print(f"stored {args.key!r}: {format_bytes(result.size)} in {result.location}", file=sys.stderr)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with _client(args) as client:
        data = client.get(args.key)
    if args.output in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        # Write beside the target, then rename: a failed get leaves no partial file.
        target = Path(args.output)
        partial = target.with_name(f".{target.name}.memctl-partial")
        partial.write_bytes(data)
        partial.replace(target)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with _client(args) as client:
        for info in client.list_keys(args.prefix):
            print(f"{info.key}\t{info.size}\t{info.location}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    if args.keys and args.nbytes:
        raise UsageError("give keys or --nbytes, not both")
    nbytes = parse_bytes(args.nbytes) if args.nbytes else None
    with _client(args) as client:
        result = client.evict(args.keys or None, nbytes)
    print(f"moved {result.values_moved} values ({format_bytes(result.bytes_moved)}) to disk")
    if result.error:
        print(f"memctl evict: some values stayed in RAM: {result.error}", file=sys.stderr)
        return 1
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        deleted = client.delete(args.keys)
    print(f"deleted {deleted} of {len(set(args.keys))}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    after = 0
    with _client(args) as client:
        while True:
            for event in client.events(limit=args.limit, scope=args.scope, after_id=after):
                after = event.id
                if args.json:
                    print(json.dumps(dataclasses.asdict(event)), flush=True)
                    continue
                when = time.strftime("%H:%M:%S", time.localtime(event.time))
                readings = (
                    f" (process {format_bytes(event.readings['process'])}, "
                    f"managed {format_bytes(event.readings['managed'])})"
                    if event.readings
                    else ""
                )
                details = "".join(f" {k}={v}" for k, v in event.details.items())
                print(f"{when} {event.kind:<9} {event.scope}: {event.reason}{readings}{details}")
            if not args.follow:
                return 0
            sys.stdout.flush()
            time.sleep(1.0)  # polling interval of --follow


def cmd_trim(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.trim(workers=args.workers)
    print(result.detail)
    print(
        f"RSS {format_bytes(result.rss_before)} -> {format_bytes(result.rss_after)} "
        f"({format_bytes(max(result.rss_before - result.rss_after, 0))} given back)"
    )
    return 0 if result.supported else 1


def _status_console() -> Console:
    """Colour and live redraws on a terminal (rich honours NO_COLOR); plain text,
    200 columns wide (no wrapped rows), when piped."""
    console = Console(highlight=False)
    if not console.is_terminal:
        console = Console(highlight=False, width=200)
    return console


def cmd_status(args: argparse.Namespace) -> int:
    if args.interval is not None and not args.watch:
        raise UsageError("--interval goes with --watch")
    if args.watch:
        if args.json:
            raise UsageError("--watch draws the bars; --json prints one reading, not both")
        interval = 1.0 if args.interval is None else args.interval
        if not (interval > 0 and math.isfinite(interval)):
            raise UsageError(f"--interval takes a number of seconds above 0; got {interval}")
        return _watch_status(args, interval)
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status.to_dict()))
        return 0
    _status_console().print(render_status(status))
    return 0


def _watch_status(args: argparse.Namespace, interval: float) -> int:
    """Redraw the bars every ``interval`` seconds until Ctrl-C (exit 0). While the
    daemon does not answer, its error replaces the header and the last readings
    stay below it; the next answer puts the bars back."""
    console = _status_console()
    # A stopped daemon should show as an error within a few refreshes, not after 60 s.
    timeout = min(args.timeout, max(5.0, 2 * interval))
    last: Status | None = None
    last_at = 0.0
    with ExitStack() as stack:
        client = stack.enter_context(_client(args, timeout))
        # Piped: one reading after another rather than redraws.
        live = (
            stack.enter_context(Live(console=console, auto_refresh=False))
            if console.is_interactive
            else None
        )
        # Ctrl-C sets a flag rather than raising: a KeyboardInterrupt raised inside a
        # blocking gRPC call can come out as a failed call, and the loop went on.
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            while not stop.is_set():
                try:
                    status = client.status()
                except MemctlError as exc:
                    age = time.monotonic() - last_at if last is not None else None
                    screen = render_unreachable(f"memctl status: {exc}", last, age)
                else:
                    last, last_at = status, time.monotonic()
                    clock = time.strftime("%H:%M:%S")
                    screen = render_status(
                        status, note=f"every {interval:g} s, last at {clock}; Ctrl-C to stop"
                    )
                if live is not None:
                    live.update(screen, refresh=True)
                else:
                    console.print(screen, "")
                stop.wait(interval)
        finally:
            signal.signal(signal.SIGINT, previous)
    return 0


# --- parser ------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="memctl", description="Per-host memory-control service and its client."
    )
    parser.add_argument("--version", action="version", version=f"memctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, handler: Handler, help_text: str, *, talks: bool = True) -> Any:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(handler=handler)
        if talks:
            sub.add_argument(
                "--address",
                default=None,
                help=f"daemon address, host:port or unix:/path (default: $MEMCTL_ADDRESS "
                f"or {DEFAULT_ADDRESS})",
            )
            sub.add_argument(
                "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per call"
            )
            sub.add_argument(
                "--token-file",
                default=None,
                help="file holding the daemon's token (default: $MEMCTL_TOKEN, "
                "$MEMCTL_TOKEN_FILE, else the daemon's own token file, found by its user)",
            )
            sub.add_argument(
                "--tls-ca", default=None, help="CA file: use TLS, trusting it (or $MEMCTL_TLS_CA)"
            )
            sub.add_argument("--tls-cert", default=None, help="client certificate, mutual TLS")
            sub.add_argument("--tls-key", default=None, help="client certificate's key")
        return sub

    def scope_flag(sub: Any) -> None:
        sub.add_argument(
            "--scope",
            dest="scope_of_data",
            default=None,
            metavar="SCOPE",
            help="act on this scope (a worker id) instead of the service's own; needs the "
            "daemon's own token",
        )

    def config_flags(sub: Any) -> None:
        sub.add_argument(
            "--address",
            default=None,
            help=f"listen here (default {DEFAULT_ADDRESS}; unix:/path accepted)",
        )
        sub.add_argument(
            "--memory-limit", default=None, help='auto | bytes ("4 GiB") | fraction (0.5) | none'
        )
        sub.add_argument(
            "--local-directory", default=None, help="where the private spill directory goes"
        )
        sub.add_argument(
            "--config",
            type=Path,
            default=None,
            help="YAML configuration file (also $MEMCTL_CONFIG)",
        )
        sub.add_argument(
            "--worker",
            default=None,
            metavar="CMD",
            help='start and supervise this worker command (nanny mode), e.g. "python w.py"',
        )
        sub.add_argument(
            "--nworkers", type=int, default=None, help="how many workers to start (default 1)"
        )
        sub.add_argument(
            "--auth",
            default=None,
            choices=("token", "none"),
            help="token (default): every call needs the daemon's token; none: no check "
            "(loopback or unix socket only)",
        )
        sub.add_argument(
            "--token-file",
            dest="serve_token_file",
            default=None,
            help="use the token in this file (mode 0600) instead of a new one per start",
        )
        sub.add_argument(
            "--insecure",
            action="store_const",
            const=True,
            default=None,
            help="allow a non-loopback address without TLS (warned about at every start)",
        )
        sub.add_argument(
            "--set",
            action="append",
            metavar="KEY=VALUE",
            help="any config key, e.g. memory.target=0.5",
        )

    config_flags(command("serve", cmd_serve, "run the daemon", talks=False))
    sub = command(
        "config",
        cmd_config,
        "print the effective configuration and where each value came from",
        talks=False,
    )
    config_flags(sub)
    sub.add_argument("--json", action="store_true", help="one JSON object")

    sub = command("status", cmd_status, "show every scope's memory bars and readings")
    sub.add_argument("--json", action="store_true", help="one JSON object, snake_case keys")
    sub.add_argument("--watch", action="store_true", help="redraw the bars live until Ctrl-C")
    sub.add_argument(
        "--interval",
        type=float,
        default=None,
        metavar="SECONDS",
        help="with --watch: seconds between readings (default 1)",
    )

    sub = command("put", cmd_put, "store a file (or - for stdin) under KEY")
    sub.add_argument("key")
    sub.add_argument("file")
    sub.add_argument("--metadata", default=None, help="opaque text stored beside the value")
    scope_flag(sub)

    sub = command("get", cmd_get, "write the value under KEY to stdout or a file")
    sub.add_argument("key")
    sub.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")
    scope_flag(sub)

    sub = command("keys", cmd_keys, "list keys with their size and location")
    sub.add_argument("--prefix", default="")
    scope_flag(sub)

    sub = command(
        "evict",
        cmd_evict,
        "move values to disk: the named KEYs, --nbytes of LRU values, or (neither) all",
    )
    sub.add_argument("keys", nargs="*")
    sub.add_argument("--nbytes", default=None, help='e.g. "100 MiB"')
    scope_flag(sub)

    sub = command("delete", cmd_delete, "remove values")
    sub.add_argument("keys", nargs="+")
    scope_flag(sub)

    sub = command(
        "events", cmd_events, "recent spills, pauses, resumes, terminations, restarts, trims"
    )
    sub.add_argument("--scope", default="", help="only this scope (service or a worker id)")
    sub.add_argument("--limit", type=int, default=0, help="only the most recent N")
    sub.add_argument("--follow", action="store_true", help="keep printing new events")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")

    sub = command("trim", cmd_trim, "ask the daemon to give free memory back to the OS")
    sub.add_argument("--workers", action="store_true", help="also ask attached workers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    name = f"memctl {args.command}"
    try:
        return int(args.handler(args))
    except UsageError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 2
    except KeyError as exc:
        print(f"{name}: no value under key {exc.args[0]!r}", file=sys.stderr)
        return 1
    except (MemctlError, ValueError) as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1 if isinstance(exc, MemctlError) else 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
