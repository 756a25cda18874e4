"""Configuration: defaults, each source and their precedence, and one-line errors."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import yaml

from memctl_server.config import (
    CONFIG_KEYS,
    ConfigError,
    LoadedConfig,
    env_variable,
    load_config,
)


def _file(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def _error(**kwargs: object) -> str:
    """The message of the ConfigError ``load_config`` raises; checks it is one line."""
    kwargs.setdefault("environ", {})
    with pytest.raises(ConfigError) as info:
        load_config(**kwargs)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    assert isinstance(info.value, ValueError)
    return message


# --- defaults --------------------------------------------------------------------


def test_defaults() -> None:
    loaded = load_config(environ={})
    cfg = loaded.config
    assert cfg.address == "127.0.0.1:7075"
    assert cfg.memory_limit == "auto"
    assert cfg.local_directory == tempfile.gettempdir()
    assert cfg.memory.target == 0.60
    assert cfg.memory.spill == 0.70
    assert cfg.memory.pause == 0.80
    assert cfg.memory.terminate == 0.95
    assert cfg.memory.monitor_interval == 0.2
    assert cfg.memory.recent_to_old_time == 30.0
    assert cfg.memory.max_spill is False
    assert cfg.memory.spill_compression == "auto"
    assert cfg.nanny.environ == {"MALLOC_TRIM_THRESHOLD_": "65536"}
    assert cfg.nanny.terminate_notice == 1.0
    assert loaded.sources == dict.fromkeys(CONFIG_KEYS, "default")


def test_every_key_has_a_source_and_a_flat_value() -> None:
    loaded = load_config(environ={})
    assert set(loaded.sources) == set(CONFIG_KEYS) == set(loaded.as_flat_dict())
    assert loaded.as_flat_dict()["memory.max-spill"] is False
    assert loaded.as_flat_dict()["memory-limit"] == "auto"
    assert loaded.as_flat_dict()["memory.monitor-interval"] == 0.2


def test_env_variable_names() -> None:
    assert env_variable("address") == "MEMCTL_ADDRESS"
    assert env_variable("memory-limit") == "MEMCTL_MEMORY_LIMIT"
    assert env_variable("local-directory") == "MEMCTL_LOCAL_DIRECTORY"
    assert env_variable("memory.target") == "MEMCTL_MEMORY__TARGET"
    assert env_variable("memory.max-spill") == "MEMCTL_MEMORY__MAX_SPILL"
    assert env_variable("memory.monitor-interval") == "MEMCTL_MEMORY__MONITOR_INTERVAL"


# --- sources ---------------------------------------------------------------------


def test_file(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        """
address: unix:/run/memctl.sock
memory-limit: 4 GiB
local-directory: /var/tmp/memctl
memory:
  target: 0.5
  spill: false
  monitor-interval: 100ms
  recent-to-old-time: 1m
  max-spill: 10 GiB
  spill-compression: zlib
nanny:
  environ:
    OMP_NUM_THREADS: 1
""",
    )
    loaded = load_config(config_file=path, environ={})
    cfg = loaded.config
    assert cfg.address == "unix:/run/memctl.sock"
    assert cfg.memory_limit == "4 GiB"
    assert cfg.local_directory == "/var/tmp/memctl"
    assert cfg.memory.target == 0.5
    assert cfg.memory.spill is False
    assert cfg.memory.monitor_interval == pytest.approx(0.1)
    assert cfg.memory.recent_to_old_time == 60.0
    assert cfg.memory.max_spill == 10 * 2**30
    assert cfg.memory.spill_compression == "zlib"
    assert cfg.nanny.environ == {"MALLOC_TRIM_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    assert loaded.sources["memory.target"] == f"file {path}"
    assert loaded.sources["nanny.environ"] == f"file {path}"
    assert loaded.sources["memory.pause"] == "default"


def test_file_named_by_memctl_config(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  target: 0.4\n")
    loaded = load_config(environ={"MEMCTL_CONFIG": str(path)})
    assert loaded.config.memory.target == 0.4
    assert loaded.sources["memory.target"] == f"file {path}"


def test_config_file_argument_beats_memctl_config(tmp_path: Path) -> None:
    chosen = _file(tmp_path, "memory:\n  target: 0.4\n", "chosen.yaml")
    other = _file(tmp_path, "memory:\n  target: 0.3\n", "other.yaml")
    loaded = load_config(config_file=chosen, environ={"MEMCTL_CONFIG": str(other)})
    assert loaded.config.memory.target == 0.4


def test_empty_file_is_all_defaults(tmp_path: Path) -> None:
    loaded = load_config(config_file=_file(tmp_path, "# nothing yet\n"), environ={})
    assert loaded.sources == dict.fromkeys(CONFIG_KEYS, "default")


def test_file_may_use_dotted_and_snake_case_keys(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory.target: 0.45\nmemory_limit: 0.5\nmemory:\n  max_spill: 1 GB\n")
    cfg = load_config(config_file=path, environ={}).config
    assert cfg.memory.target == 0.45
    assert cfg.memory_limit == "0.5"
    assert cfg.memory.max_spill == 10**9


def test_environment() -> None:
    environ = {
        "MEMCTL_ADDRESS": "[::1]:7076",
        "MEMCTL_MEMORY_LIMIT": "512MB",
        "MEMCTL_LOCAL_DIRECTORY": "~",
        "MEMCTL_MEMORY__TARGET": "0.5",
        "MEMCTL_MEMORY__SPILL": "false",
        "MEMCTL_MEMORY__MAX_SPILL": "2 GiB",
        "MEMCTL_MEMORY__MONITOR_INTERVAL": "1s",
        "MEMCTL_MEMORY__SPILL_COMPRESSION": "false",
        "MEMCTL_NANNY__ENVIRON": "{MALLOC_TRIM_THRESHOLD_: null, A: 1}",
        "PATH": "/usr/bin",
        "MEMCTLX": "not ours",
    }
    loaded = load_config(environ=environ)
    cfg = loaded.config
    assert cfg.address == "[::1]:7076"
    assert cfg.memory_limit == "512MB"
    # YAML would read "~" as null; for a path the text is what was meant.
    assert cfg.local_directory == "~"
    assert cfg.memory.target == 0.5
    assert cfg.memory.spill is False
    assert cfg.memory.max_spill == 2 * 2**30
    assert cfg.memory.monitor_interval == 1.0
    assert cfg.memory.spill_compression == "none"
    assert cfg.nanny.environ == {"A": "1"}
    assert loaded.sources["memory.target"] == "env MEMCTL_MEMORY__TARGET"
    assert loaded.sources["memory-limit"] == "env MEMCTL_MEMORY_LIMIT"
    assert loaded.sources["memory.pause"] == "default"


def test_flags_with_labels() -> None:
    loaded = load_config(
        environ={},
        overrides={"memory-limit": "4 GiB", "memory.target": 0.5, "memory.pause": "false"},
        override_labels={"memory-limit": "--memory-limit", "memory.target": "--set memory.target"},
    )
    assert loaded.config.memory_limit == "4 GiB"
    assert loaded.config.memory.target == 0.5
    assert loaded.config.memory.pause is False
    assert loaded.sources["memory-limit"] == "flag --memory-limit"
    assert loaded.sources["memory.target"] == "flag --set memory.target"
    assert loaded.sources["memory.pause"] == "flag"


def test_flags_not_given_are_none_and_ignored() -> None:
    loaded = load_config(environ={}, overrides={"memory-limit": None, "address": None})
    assert loaded.config.memory_limit == "auto"
    assert loaded.sources["memory-limit"] == "default"


def test_flag_may_be_a_path(tmp_path: Path) -> None:
    cfg = load_config(environ={}, overrides={"local-directory": tmp_path}).config
    assert cfg.local_directory == str(tmp_path)


def test_precedence_file_then_env_then_flag(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  target: 0.5\n  spill: 0.65\n  pause: 0.75\n")
    loaded = load_config(
        config_file=path,
        environ={"MEMCTL_MEMORY__SPILL": "0.66", "MEMCTL_MEMORY__PAUSE": "0.76"},
        overrides={"memory.pause": 0.77},
        override_labels={"memory.pause": "--set memory.pause"},
    )
    memory = loaded.config.memory
    assert (memory.target, memory.spill, memory.pause) == (0.5, 0.66, 0.77)
    assert loaded.sources["memory.target"] == f"file {path}"
    assert loaded.sources["memory.spill"] == "env MEMCTL_MEMORY__SPILL"
    assert loaded.sources["memory.pause"] == "flag --set memory.pause"
    assert loaded.sources["memory.terminate"] == "default"


def test_nanny_environ_merges_across_sources(tmp_path: Path) -> None:
    path = _file(tmp_path, "nanny:\n  environ:\n    A: x\n    B: y\n")
    loaded = load_config(
        config_file=path,
        environ={"MEMCTL_NANNY__ENVIRON": "{B: z}"},
        overrides={"nanny.environ": {"MALLOC_TRIM_THRESHOLD_": None, "C": 0.5}},
    )
    assert loaded.config.nanny.environ == {"A": "x", "B": "z", "C": "0.5"}
    assert loaded.sources["nanny.environ"] == "flag"


# --- values ----------------------------------------------------------------------


def test_ignore_process_memory_is_valid(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  spill: false\n  pause: false\n  terminate: false\n")
    memory = load_config(config_file=path, environ={}).config.memory
    assert (memory.spill, memory.pause, memory.terminate) == (False, False, False)
    assert memory.target == 0.60


def test_every_threshold_can_be_off_or_one() -> None:
    keys = ("target", "spill", "pause", "terminate")
    off = load_config(environ={}, overrides={f"memory.{k}": False for k in keys}).config
    assert [getattr(off.memory, k) for k in keys] == [False] * 4
    full = load_config(environ={}, overrides={f"memory.{k}": 1 for k in keys}).config
    assert [getattr(full.memory, k) for k in keys] == [1.0] * 4


@pytest.mark.parametrize(
    ("text", "seconds"), [("200ms", 0.2), ("0.5s", 0.5), ("2m", 120.0), ("3", 3.0), (4, 4.0)]
)
def test_durations(text: str | int, seconds: float) -> None:
    overrides = {"memory.monitor-interval": text, "memory.recent-to-old-time": text}
    memory = load_config(environ={}, overrides=overrides).config.memory
    assert memory.monitor_interval == pytest.approx(seconds)
    assert memory.recent_to_old_time == pytest.approx(seconds)


def test_recent_to_old_time_may_be_zero() -> None:
    memory = load_config(environ={}, overrides={"memory.recent-to-old-time": "0s"}).config.memory
    assert memory.recent_to_old_time == 0.0


def test_terminate_notice_may_be_zero_never_negative() -> None:
    nanny = load_config(environ={}, overrides={"nanny.terminate-notice": "0"}).config.nanny
    assert nanny.terminate_notice == 0.0
    with pytest.raises(ConfigError, match=r"nanny\.terminate-notice: '-1s'"):
        load_config(environ={}, overrides={"nanny.terminate-notice": "-1s"})


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("10 GiB", 10 * 2**30),
        ("512MB", 512 * 10**6),
        (1000, 1000),
        ("false", False),
        (False, False),
    ],
)
def test_max_spill(value: str | int | bool, expected: int | bool) -> None:
    memory = load_config(environ={}, overrides={"memory.max-spill": value}).config.memory
    assert memory.max_spill == expected
    assert type(memory.max_spill) is type(expected)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("auto", "auto"),
        ("lz4", "lz4"),
        ("ZLIB", "zlib"),
        ("none", "none"),
        ("false", "none"),
        (False, "none"),
        (None, "none"),
    ],
)
def test_spill_compression(value: str | bool | None, expected: str) -> None:
    # Through the section: a None flag value means "flag not given".
    overrides = {"memory": {"spill-compression": value}}
    memory = load_config(environ={}, overrides=overrides).config.memory
    assert memory.spill_compression == expected


@pytest.mark.parametrize(
    ("yaml_text", "stored"),
    [("4 GiB", "4 GiB"), ("4e9", "4e9"), ("0.5", "0.5"), ("1", "1"), ("false", "false")],
)
def test_memory_limit_keeps_its_text(tmp_path: Path, yaml_text: str, stored: str) -> None:
    path = _file(tmp_path, f"memory-limit: {yaml_text}\n")
    assert load_config(config_file=path, environ={}).config.memory_limit == stored


def test_memory_limit_null_is_none(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory-limit: null\n")
    assert load_config(config_file=path, environ={}).config.memory_limit == "none"


@pytest.mark.parametrize(
    "address", ["127.0.0.1:7075", "localhost:0", "[::1]:7075", "[::]:50051", "unix:/tmp/m.sock"]
)
def test_addresses(address: str) -> None:
    assert load_config(environ={"MEMCTL_ADDRESS": address}).config.address == address


def test_flat_dict_round_trips_through_a_file(tmp_path: Path) -> None:
    overrides = {"memory-limit": "2 GiB", "memory.pause": False, "memory.max-spill": "1 GiB"}
    first = load_config(environ={}, overrides=overrides)
    path = _file(tmp_path, yaml.safe_dump(first.as_flat_dict()))
    second = load_config(config_file=path, environ={})
    assert second.config == first.config


def test_config_is_frozen() -> None:
    loaded: LoadedConfig = load_config(environ={})
    with pytest.raises(ValueError):
        loaded.config.memory.target = 0.1


# --- errors ----------------------------------------------------------------------


def test_threshold_out_of_range_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  target: 1.7\n")
    assert _error(config_file=path) == (
        f"memory.target: 1.7 (from file {path}) is not allowed; "
        "use a fraction between 0 and 1, or false"
    )


@pytest.mark.parametrize("value", [0, -0.1, 1.01, True, "half", "nan", None])
def test_bad_thresholds(value: object) -> None:
    # Through the section: a None flag value means "flag not given".
    message = _error(overrides={"memory": {"spill": value}})
    assert message.startswith(f"memory.spill: {value!r} (from flag) is not allowed; use a fraction")


def test_unknown_key_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  targte: 0.5\n")
    message = _error(config_file=path)
    assert message.startswith(f"unknown key 'memory.targte' in file {path}; known keys: address, ")
    assert "memory.target" in message and "local-directory" in message


def test_unknown_top_level_key_in_file(tmp_path: Path) -> None:
    path = _file(tmp_path, "memroy-limit: 4 GiB\n")
    message = _error(config_file=path)
    assert message.startswith(f"unknown key 'memroy-limit' in file {path}; known keys: ")
    assert "memory-limit" in message and "nanny.environ" in message


def test_unknown_flag_key() -> None:
    message = _error(overrides={"memory.targte": 0.5}, override_labels={"memory.targte": "--set"})
    assert message.startswith("unknown key 'memory.targte' in flag --set; known keys: ")


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory: 0.5\n")
    message = _error(config_file=path)
    assert message.startswith(f"memory: 0.5 (from file {path}) is not allowed; use a mapping")
    assert "memory.target" in message


def test_memory_limit_not_understood_from_flag() -> None:
    message = _error(
        overrides={"memory-limit": "lots"}, override_labels={"memory-limit": "--memory-limit"}
    )
    assert message == (
        "memory-limit: 'lots' (from flag --memory-limit) is not understood; use auto, "
        'a size like "4 GiB", a fraction of the host\'s memory like 0.5, or none'
    )


@pytest.mark.parametrize("value", ["", "-1", "1.5", "true"])
def test_bad_memory_limits_from_env(value: str) -> None:
    message = _error(environ={"MEMCTL_MEMORY_LIMIT": value})
    assert message.startswith("memory-limit: ")
    assert "(from env MEMCTL_MEMORY_LIMIT) is not understood; use auto" in message


def test_unknown_environment_variable() -> None:
    message = _error(environ={"MEMCTL_MEMORY__TARGTE": "0.5"})
    assert message.startswith("unknown environment variable MEMCTL_MEMORY__TARGTE; memctl reads ")
    assert "MEMCTL_MEMORY__TARGET" in message and "MEMCTL_CONFIG" in message


def test_env_error_names_the_variable() -> None:
    message = _error(environ={"MEMCTL_MEMORY__PAUSE": "2"})
    assert message == (
        "memory.pause: 2 (from env MEMCTL_MEMORY__PAUSE) is not allowed; "
        "use a fraction between 0 and 1, or false"
    )


@pytest.mark.parametrize(
    "address", ["localhost", "1.2.3.4:99999", "::1:7075", ":7075", "unix:", "host:port", 7075]
)
def test_bad_addresses(address: object) -> None:
    message = _error(overrides={"address": address})
    assert message.startswith(f"address: {address!r} (from flag) is not allowed; use host:port")


@pytest.mark.parametrize("value", ["fast", "-1s", 0, "0ms", True])
def test_bad_monitor_interval(value: object) -> None:
    message = _error(overrides={"memory.monitor-interval": value})
    assert message.startswith(f"memory.monitor-interval: {value!r} (from flag) is not allowed; ")
    assert "200ms" in message


@pytest.mark.parametrize("value", ["lots", "-1 GiB", True])
def test_bad_max_spill(value: object) -> None:
    message = _error(overrides={"memory.max-spill": value})
    assert message == (
        f'memory.max-spill: {value!r} (from flag) is not allowed; use a size like "10 GiB", '
        "or false"
    )


def test_bad_compression() -> None:
    message = _error(overrides={"memory.spill-compression": "snappy"})
    assert message == (
        "memory.spill-compression: 'snappy' (from flag) is not allowed; use auto, lz4, zlib or none"
    )


@pytest.mark.parametrize("value", [["A=1"], {"A": [1]}, {"A=B": "1"}, "A=1"])
def test_bad_nanny_environ(value: object) -> None:
    message = _error(overrides={"nanny.environ": value})
    assert message.startswith("nanny.environ: ")
    assert "is not allowed; use a mapping of environment variable names" in message


@pytest.mark.parametrize("value", ["", "   ", 5])
def test_bad_local_directory(value: object) -> None:
    message = _error(overrides={"local-directory": value})
    assert (
        message
        == f"local-directory: {value!r} (from flag) is not allowed; use the path of a directory"
    )


def test_several_problems_are_counted_on_one_line(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  target: 2\n  pause: 3\n")
    message = _error(config_file=path)
    assert message.startswith(f"memory.target: 2 (from file {path}) is not allowed")
    assert message.endswith("(and 1 more)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    message = _error(config_file=path)
    assert message == f"cannot read config file {path}: No such file or directory"


def test_missing_file_named_by_memctl_config(tmp_path: Path) -> None:
    path = tmp_path / "missing.yaml"
    message = _error(environ={"MEMCTL_CONFIG": str(path)})
    assert message.startswith(f"cannot read config file {path} (named by MEMCTL_CONFIG): ")


def test_directory_as_file(tmp_path: Path) -> None:
    assert _error(config_file=tmp_path).startswith(f"cannot read config file {tmp_path}: ")


def test_file_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes(b"\xff\xfe\x00bad")
    assert _error(config_file=path) == f"cannot read config file {path}: it is not UTF-8 text"


def test_invalid_yaml(tmp_path: Path) -> None:
    path = _file(tmp_path, "memory:\n  target: [0.5\n  spill: 0.7\n")
    message = _error(config_file=path)
    assert message.startswith(f"config file {path} is not valid YAML: ")
    assert "line " in message


@pytest.mark.parametrize("text", ["- memory-limit: 4 GiB\n", "4 GiB\n"])
def test_file_must_hold_a_mapping(tmp_path: Path, text: str) -> None:
    path = _file(tmp_path, text)
    assert _error(config_file=path).startswith(
        f"config file {path} must hold a mapping of keys to values"
    )
