"""The service's configuration: its keys, their defaults, and where each value came from.

Keys mirror Dask's worker settings in kebab-case (``memory.target``,
``memory.monitor-interval``, ``nanny.environ``). Values come from four sources, later
ones winning: the defaults here < a YAML file (``--config FILE`` or ``MEMCTL_CONFIG``)
< ``MEMCTL_*`` environment variables < command-line flags. The pydantic models below
are the one list of keys: adding a key is one line in a model, and the file, the
environment and the flags learn it from there.

Every mistake raises ``ConfigError`` with one line that names the key, the value, its
source and what is allowed, because a daemon that fails to start must say why in its
first log line. Typos are errors too, not silently ignored as in Dask.

Not covered here: what ``memory-limit`` comes to on this host (``limits.py``) and the
command-line parser that builds the overrides.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PlainValidator, ValidationError
from pydantic_core import ErrorDetails

from memctl import auth
from memctl.sizes import parse_bytes, parse_duration

from .limits import MEMORY_LIMIT_FORMS, check_memory_limit

Threshold = float | Literal[False]
SpillCompression = Literal["auto", "lz4", "zlib", "none"]

#: ``MEMCTL_*`` variables that are not configuration keys, so are not typos: the
#: config file, and what clients and nanny-started workers read.
NON_CONFIG_VARIABLES = frozenset(
    {
        "MEMCTL_CONFIG",
        auth.TOKEN_VARIABLE,
        auth.TOKEN_FILE_VARIABLE,
        auth.RESUME_SECRET_VARIABLE,
        auth.WORKER_ID_VARIABLE,
        "MEMCTL_TLS_CA",
        "MEMCTL_TLS_CERT",
        "MEMCTL_TLS_KEY",
        "MEMCTL_TRANSPORT",
    }
)
_ENV_PREFIX = "MEMCTL_"


class ConfigError(ValueError):
    """A configuration value, file or variable that cannot be used; the message is one line."""


# --- values ----------------------------------------------------------------------
# Each validator takes what a YAML file, an environment variable or a flag may hold
# and returns the stored form. It raises ValueError with the end of the error line
# ("is not allowed; use ..."); ``_problem`` puts the key, value and source in front.


def _is_false(value: object) -> bool:
    return value is False or (isinstance(value, str) and value.strip().lower() == "false")


def _number(value: object) -> float | None:
    """A number given as a number or as text; None for anything else (booleans too)."""
    if not isinstance(value, bool) and isinstance(value, str | int | float):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _fraction(value: object) -> Threshold:
    if _is_false(value):
        return False
    number = _number(value)
    if number is not None and 0 < number <= 1:
        return number
    raise ValueError("is not allowed; use a fraction between 0 and 1, or false")


def _duration(value: object) -> float:
    if isinstance(value, str | int | float):
        try:
            return parse_duration(value)
        except ValueError:
            pass
    raise ValueError("is not allowed; use a duration like 200ms, 30s or 5m, or a number of seconds")


def _interval(value: object) -> float:
    seconds = _duration(value)
    if seconds == 0:
        # A zero interval would make the monitor spin.
        raise ValueError("is not allowed; use a duration above zero, like 200ms")
    return seconds


def _byte_budget(value: object) -> int | Literal[False]:
    if _is_false(value):
        return False
    if isinstance(value, str | int | float):
        try:
            return parse_bytes(value)
        except ValueError:
            pass
    raise ValueError('is not allowed; use a size like "10 GiB", or false')


_COMPRESSIONS: dict[str, SpillCompression] = {
    "auto": "auto",
    "lz4": "lz4",
    "zlib": "zlib",
    "none": "none",
    "false": "none",
}


def _compression(value: object) -> SpillCompression:
    if value is False or value is None:
        return "none"
    if isinstance(value, str) and value.strip().lower() in _COMPRESSIONS:
        return _COMPRESSIONS[value.strip().lower()]
    raise ValueError("is not allowed; use auto, lz4, zlib or none")


def _memory_limit(value: object) -> str:
    """Keep the text as given, so ``memctl config`` shows it; limits.py resolves it later."""
    if value is None or isinstance(value, str | int | float):
        try:
            check_memory_limit(value)
        except ValueError:
            pass
        else:
            return "none" if value is None else "false" if value is False else str(value)
    raise ValueError(f"is not understood; {MEMORY_LIMIT_FORMS}")


_HOST_PORT = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(\d{1,5})")


def _address(value: object) -> str:
    if isinstance(value, str):
        if value.startswith("unix:") and value != "unix:":
            return value
        match = _HOST_PORT.fullmatch(value)
        if match is not None and int(match.group(2)) <= 65535:
            return value
    raise ValueError(
        "is not allowed; use host:port like 127.0.0.1:7075 or [::1]:7075, or unix:/path/to/socket"
    )


def _directory(value: object) -> str:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value
    raise ValueError("is not allowed; use the path of a directory")


def _environ(value: object) -> dict[str, str]:
    """Values become strings as in Dask's nanny; ``null`` removes a variable set earlier."""
    if isinstance(value, Mapping):
        environ = {name: item for name, item in value.items() if item is not None}
        if all(
            isinstance(name, str)
            and name
            and "=" not in name
            and isinstance(item, str | int | float)
            for name, item in environ.items()
        ):
            return {str(name): str(item) for name, item in environ.items()}
    raise ValueError(
        "is not allowed; use a mapping of environment variable names to values, "
        "like {MALLOC_TRIM_THRESHOLD_: 65536}"
    )


def _margin(value: object) -> float:
    number = _number(value)
    if number is not None and 0 <= number < 1:
        return number
    raise ValueError("is not allowed; use a fraction of the limit from 0 to below 1, like 0.05")


def _optional_duration(value: object) -> float | Literal[False]:
    if _is_false(value) or value is None:
        return False
    seconds = _duration(value)
    if seconds == 0:
        raise ValueError("is not allowed; use a duration above zero, like 5m, or false")
    return seconds


def _command(value: object) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        return value
    raise ValueError('is not allowed; use a command line, like "python my_worker.py"')


def _positive_int(value: object) -> int:
    if not isinstance(value, bool) and isinstance(value, str | int):
        try:
            number = int(value)
        except ValueError:
            pass
        else:
            if number >= 1:
                return number
    raise ValueError("is not allowed; use a whole number of at least 1")


_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


def _import_path(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and _IMPORT_PATH.fullmatch(value.strip()):
        return value.strip()
    raise ValueError(
        'is not allowed; use "package.module:callable", or null for the built-in store'
    )


def _kwargs(value: object) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return dict(value)
    raise ValueError("is not allowed; use a mapping of keyword arguments")


_EXPORTERS = ("prometheus", "otlp")


def _exporters(value: object) -> tuple[str, ...] | None:
    """A list (or comma-separated text) of exporters; null: ask OTEL_METRICS_EXPORTER."""
    if value is None:
        return None
    if _is_false(value) or value == "none":
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if isinstance(items, list | tuple):
        names = tuple(str(item).strip().lower() for item in items if str(item).strip())
        if all(name in _EXPORTERS for name in names):
            return names
    raise ValueError("is not allowed; use a list of exporters: prometheus, otlp (or none)")


def _optional_address(value: object) -> str | None:
    return None if value is None else _address(value)


def _optional_interval(value: object) -> float | None:
    return None if value is None else _interval(value)


def _optional_text(value: object) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    raise ValueError("is not allowed; use text, or null")


def _log_format(value: object) -> Literal["text", "json"]:
    if isinstance(value, str) and value.strip().lower() in ("text", "json"):
        return "json" if value.strip().lower() == "json" else "text"
    raise ValueError("is not allowed; use text or json")


def _optional_path(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, str) and value.strip():
        return value.strip()
    raise ValueError("is not allowed; use the path of a file, or null")


def _auth_mode(value: object) -> Literal["token", "none"]:
    if _is_false(value) or (isinstance(value, str) and value.strip().lower() == "none"):
        return "none"
    if isinstance(value, str) and value.strip().lower() == "token":
        return "token"
    raise ValueError(
        "is not allowed; use token (every call needs the daemon's token) or none "
        "(no authentication: loopback and unix sockets only)"
    )


def _file_mode(value: object) -> str:
    """Octal permission bits as text ("0660"), however YAML read them (0o660 or "0660")."""
    if isinstance(value, int) and not isinstance(value, bool):
        text = format(value, "o")
    else:
        text = str(value).strip().lower().removeprefix("0o")
    if re.fullmatch(r"0?[0-7]{3}", text):
        mode = int(text, 8)
        if mode & 0o600 == 0o600 and mode & 0o007 == 0:
            return f"0{mode:03o}"
        raise ValueError(
            "is not allowed; the owner needs read and write (6 in the first digit) and "
            "others get nothing (0 in the last): 0600, or 0660 to share with a group"
        )
    raise ValueError('is not allowed; use octal permission bits like "0600" or "0660"')


def _group(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value).strip()
    raise ValueError("is not allowed; use a group name or number, or null")


def _message_size(value: object) -> int:
    try:
        size = _byte_budget(value)
    except ValueError:
        size = False
    # A Put or Get message holds a 1 MiB chunk and its framing.
    if size is False or size < 2 * 1024 * 1024:
        raise ValueError(
            'is not allowed; use a size of at least 2 MiB, like "4 MiB" (values travel '
            "in 1 MiB chunks)"
        )
    return size


def _segment_threshold(value: object) -> int:
    try:
        size = _byte_budget(value)
    except ValueError:
        size = False
    if size is False or not 4096 <= size <= 1024**3:
        raise ValueError(
            'is not allowed; use a size from 4 KiB to 1 GiB, like "1 MiB" (smaller values '
            "travel inline in frames)"
        )
    return size


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no"):
        return value.strip().lower() in ("true", "yes")
    raise ValueError("is not allowed; use true or false")


_Bool = Annotated[bool, PlainValidator(_bool)]
_OptionalPath = Annotated[str | None, PlainValidator(_optional_path)]
_AuthMode = Annotated[Literal["token", "none"], PlainValidator(_auth_mode)]
_FileMode = Annotated[str, PlainValidator(_file_mode)]
_Group = Annotated[str | None, PlainValidator(_group)]
_MessageSize = Annotated[int, PlainValidator(_message_size)]
_SegmentThreshold = Annotated[int, PlainValidator(_segment_threshold)]
_Fraction = Annotated[Threshold, PlainValidator(_fraction)]
_Exporters = Annotated[tuple[str, ...] | None, PlainValidator(_exporters)]
_OptionalAddress = Annotated[str | None, PlainValidator(_optional_address)]
_OptionalInterval = Annotated[float | None, PlainValidator(_optional_interval)]
_OptionalText = Annotated[str | None, PlainValidator(_optional_text)]
_LogFormat = Annotated[Literal["text", "json"], PlainValidator(_log_format)]
_Margin = Annotated[float, PlainValidator(_margin)]
_OptionalDuration = Annotated[float | Literal[False], PlainValidator(_optional_duration)]
_Command = Annotated[str | None, PlainValidator(_command)]
_PositiveInt = Annotated[int, PlainValidator(_positive_int)]
_ImportPath = Annotated[str | None, PlainValidator(_import_path)]
_Kwargs = Annotated[dict[str, Any], PlainValidator(_kwargs)]
_Duration = Annotated[float, PlainValidator(_duration)]
_Interval = Annotated[float, PlainValidator(_interval)]
_ByteBudget = Annotated[int | Literal[False], PlainValidator(_byte_budget)]
_Compression = Annotated[SpillCompression, PlainValidator(_compression)]
_MemoryLimit = Annotated[str, PlainValidator(_memory_limit)]
_Address = Annotated[str, PlainValidator(_address)]
_Directory = Annotated[str, PlainValidator(_directory)]
_Environ = Annotated[dict[str, str], PlainValidator(_environ)]


# --- models ----------------------------------------------------------------------
# Defaults are written in their stored form (0.2 for "200ms"); pydantic does not
# validate defaults.


def _kebab(name: str) -> str:
    return name.replace("_", "-")


class _Section(BaseModel):
    """A group of keys: spelled in kebab-case in YAML, snake_case in Python."""

    model_config = ConfigDict(
        alias_generator=_kebab, populate_by_name=True, extra="forbid", frozen=True
    )


class MemoryConfig(_Section):
    """Thresholds are fractions of a scope's memory limit (PRODUCT.md, "Thresholds")."""

    target: _Fraction = 0.60
    spill: _Fraction = 0.70
    pause: _Fraction = 0.80
    terminate: _Fraction = 0.95
    #: Dask's code says 100 ms and its docs 200 ms; memctl uses 200 ms.
    monitor_interval: _Interval = 0.2
    recent_to_old_time: _Duration = 30.0
    max_spill: _ByteBudget = False
    spill_compression: _Compression = "auto"
    #: Resume a paused worker only below pause - margin, so one hovering at the pause
    #: line is not flapped every tick (Dask has no margin: dask/distributed#7742).
    resume_margin: _Margin = 0.05
    #: Restart a supervised worker that stays paused this long (#3761, #5999).
    pause_timeout: _OptionalDuration = False
    #: How long a Put waits for room (RAM or disk) before RESOURCE_EXHAUSTED, at most
    #: (a Put's own deadline may be shorter).
    put_wait: _Duration = 5.0


class ControlConfig(_Section):
    """The worker control stream (Attach)."""

    #: How often attached workers send a heartbeat; one read by PID, whose process is
    #: watched instead, only every heartbeat-timeout / 2 if that is longer.
    heartbeat_interval: _Interval = 1.0
    #: A worker silent this long is detached (its data kept), unless its process is
    #: alive on this host: a held thread delays heartbeats, not the process.
    heartbeat_timeout: _Interval = 10.0
    #: How long a detached worker's data is kept for it to re-attach.
    retention: _Duration = 3600.0


class StoreConfig(_Section):
    """A user-supplied ``MutableMapping[str, bytes]`` to replace the built-in store."""

    #: "package.module:callable" returning the mapping; null for the built-in store.
    factory: _ImportPath = None
    kwargs: _Kwargs = Field(default_factory=dict)


class NannyConfig(_Section):
    #: Set before a worker starts; glibc then returns freed memory to the OS sooner.
    environ: _Environ = Field(default_factory=lambda: {"MALLOC_TRIM_THRESHOLD_": "65536"})
    #: A worker command line to start and supervise (``--worker``); null: none.
    worker: _Command = None
    #: How many copies of the worker to run (``--nworkers``).
    nworkers: _PositiveInt = 1
    #: How long a supervised worker has to act on TERMINATE before SIGTERM; it ends
    #: early when the worker answers, exits or its stream ends. 0: signal at once.
    terminate_notice: _Duration = 1.0
    #: Seconds between SIGTERM and SIGKILL when terminating a supervised worker.
    terminate_grace: _Interval = 5.0


class MetricsConfig(_Section):
    """OpenTelemetry metrics; each null falls back to the standard ``OTEL_*`` variable."""

    #: prometheus and/or otlp; null: OTEL_METRICS_EXPORTER, else none (off costs nothing).
    exporters: _Exporters = None
    #: Where /metrics is served; null: OTEL_EXPORTER_PROMETHEUS_HOST/PORT, else 127.0.0.1:9464.
    prometheus_address: _OptionalAddress = None
    #: OTLP/gRPC collector; null: OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT, else localhost:4317.
    otlp_endpoint: _OptionalText = None
    #: How often OTLP pushes; null: OTEL_METRIC_EXPORT_INTERVAL, else 60 s.
    export_interval: _OptionalInterval = None


class LogConfig(_Section):
    #: json: one JSON object per line, events with all their fields.
    format: _LogFormat = "text"


class TlsConfig(_Section):
    """TLS for the gRPC listener: both ``cert`` and ``key``, or neither."""

    #: PEM certificate chain the daemon presents.
    cert: _OptionalPath = None
    #: PEM private key of ``cert``.
    key: _OptionalPath = None
    #: PEM CA certificates; set: every client must present a certificate they signed
    #: (mutual TLS).
    client_ca: _OptionalPath = None


class LimitsConfig(_Section):
    """What one call, one client and all clients together may ask of the daemon.

    Per-client limits share the daemon out among well-behaved clients (a client is
    one ``memctl.Client``, or one connection for clients that do not say); the
    totals protect it from the rest.
    """

    #: The largest value a Put may store; false: only RAM and disk bound it.
    max_value_size: _ByteBudget = 16 * 1024**3
    #: The largest gRPC message the daemon accepts.
    max_message_size: _MessageSize = 4 * 1024 * 1024
    #: Calls in progress at once, streams (Put, Get, Attach) included.
    max_calls: _PositiveInt = 10_000
    #: Calls in progress at once from one client.
    max_calls_per_client: _PositiveInt = 1_000
    #: Attach sessions open at once from one client.
    max_sessions_per_client: _PositiveInt = 64


class SameHostConfig(_Section):
    """The same-host channel: a unix socket beside gRPC for clients on this host, with
    large values passed as shared memory (the protocol: protos/SAME_HOST.md)."""

    enabled: _Bool = True
    #: The channel's unix socket; null: ``channel-<hash of address>.sock`` in the
    #: runtime directory.
    socket: _OptionalPath = None
    #: Where the daemon makes its directory for clients that cannot pass file
    #: descriptors (they write large values there as files); null: /dev/shm.
    shm_directory: _OptionalPath = None
    #: Values of at least this size travel as shared-memory segments, smaller ones
    #: inline in frames.
    segment_threshold: _SegmentThreshold = 1024 * 1024
    #: Connections open at once.
    max_connections: _PositiveInt = 1024


class ServiceConfig(_Section):
    """The whole configuration; ``load_config`` builds it."""

    #: Loopback by default; any other address needs TLS, or ``insecure``.
    address: _Address = "127.0.0.1:7075"
    #: token: every call carries the daemon's token; none: no check (loopback and
    #: unix sockets only).
    auth: _AuthMode = "token"
    #: A file holding the token (mode 0600); null: a new random token at every start.
    token_file: _OptionalPath = None
    #: Where the daemon writes its token file (0700, the daemon's user only); null:
    #: $XDG_RUNTIME_DIR/memctl, /run/memctl for root, else <tmp>/memctl-<uid>.
    runtime_directory: _OptionalPath = None
    #: Allow a non-loopback address without TLS (warned about at every start).
    insecure: _Bool = False
    #: Permission bits of a unix socket, whatever the umask; 0660 shares it with
    #: ``unix-socket-group``.
    unix_socket_mode: _FileMode = "0600"
    #: The group a unix socket belongs to; null: the daemon's own.
    unix_socket_group: _Group = None
    tls: TlsConfig = Field(default_factory=TlsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    same_host: SameHostConfig = Field(default_factory=SameHostConfig)
    memory_limit: _MemoryLimit = "auto"
    local_directory: _Directory = Field(default_factory=tempfile.gettempdir)
    #: Keep values across restarts: spill files in <local-directory>/memctl-data, every
    #: value written there at shutdown and served again by the next start.
    persist: _Bool = False
    memory: MemoryConfig = Field(default_factory=MemoryConfig)
    nanny: NannyConfig = Field(default_factory=NannyConfig)
    control: ControlConfig = Field(default_factory=ControlConfig)
    store: StoreConfig = Field(default_factory=StoreConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    log: LogConfig = Field(default_factory=LogConfig)


def _keys(model: type[BaseModel], prefix: str = "") -> Iterator[tuple[str, bool]]:
    """Every dotted key under ``model``, and whether it is a section."""
    for name, field in model.model_fields.items():
        key = prefix + (field.alias or name)
        section = field.annotation
        if isinstance(section, type) and issubclass(section, BaseModel):
            yield key, True
            yield from _keys(section, key + ".")
        else:
            yield key, False


#: The keys that hold values, in the order of the models.
CONFIG_KEYS = tuple(key for key, is_section in _keys(ServiceConfig) if not is_section)
_SECTIONS = frozenset(key for key, is_section in _keys(ServiceConfig) if is_section)


def env_variable(key: str) -> str:
    """The variable that sets ``key``: ``memory.max-spill`` → ``MEMCTL_MEMORY__MAX_SPILL``."""
    return _ENV_PREFIX + key.upper().replace(".", "__").replace("-", "_")


_KEY_OF_VARIABLE = {env_variable(key): key for key in CONFIG_KEYS}


def _flat(model: BaseModel, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for name, field in type(model).model_fields.items():
        key = prefix + (field.alias or name)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            flat.update(_flat(value, key + "."))
        else:
            flat[key] = value
    return flat


@dataclass(frozen=True)
class LoadedConfig:
    """The validated configuration and, for every dotted key, where its value came from."""

    config: ServiceConfig
    #: Dotted key → "default", "file PATH", "env MEMCTL_…" or "flag --…".
    sources: dict[str, str]

    def as_flat_dict(self) -> dict[str, object]:
        """Dotted key → value as a user would write it, for ``memctl config``."""
        return _flat(self.config)


# --- sources ---------------------------------------------------------------------


def _entries(key: str, value: object, label: str) -> Iterator[tuple[str, object]]:
    """The (dotted key, value) pairs that setting ``key`` to ``value`` means.

    A section takes a mapping of its keys, so a YAML file can nest (``memory:
    {target: 0.5}``) or use dotted keys as ``memctl config`` prints them. As in Dask,
    ``_`` and ``-`` are the same in key names.
    """
    key = key.replace("_", "-")
    if key in CONFIG_KEYS:
        yield key, value
    elif key in _SECTIONS:
        if not isinstance(value, Mapping):
            inside = [known for known in CONFIG_KEYS if known.startswith(key + ".")]
            raise ConfigError(
                f"{key}: {value!r} (from {label}) is not allowed; "
                f"use a mapping of its keys ({', '.join(inside)})"
            )
        for name, inner in value.items():
            yield from _entries(f"{key}.{name}", inner, label)
    else:
        raise ConfigError(
            f"unknown key {key!r} in {label}; known keys: {', '.join(sorted(CONFIG_KEYS))}"
        )


def _read_file(path: Path, named_by: str) -> Mapping[object, object]:
    where = f"config file {path}{named_by}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError(f"cannot read {where}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"cannot read {where}: it is not UTF-8 text") from None
    try:
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{where} is not valid YAML: {error.problem}{at}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where} is not valid YAML: {' '.join(str(error).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{where} must hold a mapping of keys to values, like 'memory-limit: 4 GiB', "
            f"not a {type(data).__name__}"
        )
    return data


def _env_value(text: str) -> object:
    """Read ``false``, ``0.5`` and mappings as YAML does; anything else stays text.

    Text stays text even where YAML would read it otherwise (``~`` as null,
    ``[::1]:7075`` as a list), because for these keys the text is what was meant.
    """
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return value if isinstance(value, bool | int | float | dict) else text


def _env_entries(environ: Mapping[str, str]) -> Iterator[tuple[str, object, str]]:
    for variable, text in environ.items():
        if not variable.startswith(_ENV_PREFIX) or variable in NON_CONFIG_VARIABLES:
            continue
        key = _KEY_OF_VARIABLE.get(variable)
        if key is None:
            known = sorted([*_KEY_OF_VARIABLE, *NON_CONFIG_VARIABLES])
            raise ConfigError(
                f"unknown environment variable {variable}; memctl reads {', '.join(known)}"
            )
        yield key, _env_value(text), f"env {variable}"


def _problem(error: ErrorDetails, raw: Mapping[str, object], sources: Mapping[str, str]) -> str:
    """One pydantic error as one line: key, value, source, what is allowed."""
    key = ".".join(str(part) for part in error["loc"])
    while key not in raw and "." in key:
        # An error inside a value (an item of a mapping) belongs to the key holding it.
        key = key.rsplit(".", 1)[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, ValueError):
        reason = str(cause)
    else:
        # Keys without a validator of their own get pydantic's (one-line) message.
        reason = f"is not allowed; {error['msg'][:1].lower()}{error['msg'][1:]}"
    value = raw.get(key, error.get("input"))
    return f"{key}: {value!r} (from {sources.get(key, 'default')}) {reason}"


def load_config(
    *,
    config_file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
    override_labels: Mapping[str, str] | None = None,
) -> LoadedConfig:
    """Read defaults, the YAML file, ``MEMCTL_*`` variables and flags, later ones winning.

    ``environ`` defaults to ``os.environ``; ``config_file`` defaults to
    ``$MEMCTL_CONFIG``. ``overrides`` maps dotted keys to the values of the flags
    given (``{"memory-limit": "4 GiB"}``); a None value means the flag was not given.
    ``override_labels`` names each flag for ``sources`` (``"--memory-limit"``).
    Raises ``ConfigError`` with a one-line message.
    """
    environ = os.environ if environ is None else environ
    layers: list[tuple[str, object, str]] = []
    named_by = ""
    if config_file is None and environ.get("MEMCTL_CONFIG"):
        config_file, named_by = Path(environ["MEMCTL_CONFIG"]), " (named by MEMCTL_CONFIG)"
    if config_file is not None:
        label = f"file {config_file}"
        for name, value in _read_file(config_file, named_by).items():
            layers += [(key, item, label) for key, item in _entries(str(name), value, label)]
    layers += _env_entries(environ)
    for name, value in (overrides or {}).items():
        if value is not None:
            given = (override_labels or {}).get(name)
            label = f"flag {given}" if given else "flag"
            layers += [(key, item, label) for key, item in _entries(name, value, label)]

    raw = _flat(ServiceConfig())
    sources = dict.fromkeys(raw, "default")
    for key, value, label in layers:
        earlier = raw[key]
        if isinstance(earlier, Mapping) and isinstance(value, Mapping):
            # Mappings (nanny.environ) merge as in Dask, so adding a variable keeps
            # MALLOC_TRIM_THRESHOLD_; set one to null to remove it.
            value = {**earlier, **value}
        raw[key], sources[key] = value, label

    nested: dict[str, Any] = {}
    for key, value in raw.items():
        *sections, name = key.split(".")
        node = nested
        for section in sections:
            node = node.setdefault(section, {})
        node[name] = value
    try:
        config = ServiceConfig.model_validate(nested)
    except ValidationError as error:
        problems = [_problem(detail, raw, sources) for detail in error.errors()]
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more) from None
    return LoadedConfig(config, sources)
