"""The ``memctl`` command line: run the daemon, and talk to it.

Every command that talks to a daemon takes ``--address`` and honours
``MEMCTL_ADDRESS``. Errors are one line on stderr: exit 1 for a failed operation
(missing key, service unreachable), 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from . import __version__
from ._base import DEFAULT_ADDRESS, DEFAULT_TIMEOUT
from .client import Client
from .errors import MemctlError
from .sizes import format_bytes, parse_bytes

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """Bad command-line input: exit code 2."""


def _client(args: argparse.Namespace) -> Client:
    return Client(args.address, timeout=args.timeout)


# --- serve and config ----------------------------------------------------------------
_SERVE_FLAGS = {
    "address": ("address", "--address"),
    "memory_limit": ("memory-limit", "--memory-limit"),
    "local_directory": ("local-directory", "--local-directory"),
    "worker": ("nanny.worker", "--worker"),
    "nworkers": ("nanny.nworkers", "--nworkers"),
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


def cmd_config(args: argparse.Namespace) -> int:
    loaded = _load_config(args)
    flat = loaded.as_flat_dict()
    if args.json:
        print(json.dumps({k: {"value": v, "source": loaded.sources[k]} for k, v in flat.items()}))
        return 0
    width = max(len(k) for k in flat)
    for key, value in flat.items():
        shown = json.dumps(value) if not isinstance(value, str) else value
        print(f"{key:<{width}}  {shown:<24}  ({loaded.sources[key]})")
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


def cmd_trim(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.trim(workers=args.workers)
    print(result.detail)
    print(
        f"RSS {format_bytes(result.rss_before)} -> {format_bytes(result.rss_after)} "
        f"({format_bytes(max(result.rss_before - result.rss_after, 0))} given back)"
    )
    return 0 if result.supported else 1


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    if args.json:
        print(json.dumps(status.to_dict()))
        return 0
    console = Console(highlight=False)
    if not console.is_terminal:  # piped: don't wrap rows at 80 columns
        console = Console(highlight=False, width=200)
    console.print(
        f"memctl {status.version} (pid {status.pid}), up {status.uptime_seconds:.0f} s, "
        f"host memory {format_bytes(status.total_memory)}, spilling to {status.spill_directory}"
    )
    table = Table(box=None, pad_edge=False)
    for column in (
        "scope",
        "state",
        "process",
        "managed",
        "unmanaged",
        "recent",
        "spilled",
        "limit",
        "in RAM",
        "on disk",
    ):
        table.add_column(
            column, justify="left" if column in ("scope", "state") else "right", no_wrap=True
        )
    for scope in status.scopes:
        state = scope.state + (", spilling" if scope.spilling else "")
        table.add_row(
            scope.name,
            state,
            *(
                format_bytes(n)
                for n in (
                    scope.process,
                    scope.managed,
                    scope.unmanaged,
                    scope.unmanaged_recent,
                    scope.spilled,
                )
            ),
            format_bytes(scope.memory_limit) if scope.memory_limit else "none",
            str(scope.keys_in_memory),
            str(scope.keys_on_disk),
        )
    console.print(table)
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
        return sub

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

    sub = command("status", cmd_status, "show every scope's memory readings")
    sub.add_argument("--json", action="store_true", help="one JSON object, snake_case keys")

    sub = command("put", cmd_put, "store a file (or - for stdin) under KEY")
    sub.add_argument("key")
    sub.add_argument("file")
    sub.add_argument("--metadata", default=None, help="opaque text stored beside the value")

    sub = command("get", cmd_get, "write the value under KEY to stdout or a file")
    sub.add_argument("key")
    sub.add_argument("-o", "--output", default=None, help="file to write (default: stdout)")

    sub = command("keys", cmd_keys, "list keys with their size and location")
    sub.add_argument("--prefix", default="")

    sub = command(
        "evict",
        cmd_evict,
        "move values to disk: the named KEYs, --nbytes of LRU values, or (neither) all",
    )
    sub.add_argument("keys", nargs="*")
    sub.add_argument("--nbytes", default=None, help='e.g. "100 MiB"')

    sub = command("delete", cmd_delete, "remove values")
    sub.add_argument("keys", nargs="+")

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
