"""The ``memctl`` command line against a real daemon."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from memctl import Client
from tests.conftest import DATA_PLANE, Daemon, run_memctl

pytestmark = DATA_PLANE

MiB = 1 << 20
JEMALLOC = Path(f"/usr/lib/{os.uname().machine}-linux-gnu/libjemalloc.so.2")


def test_status_json_has_the_readings(spawn: Callable[..., Daemon]) -> None:
    daemon = spawn("--memory-limit", "1GiB")
    with Client(daemon.address) as client:
        client.put("a", b"x" * MiB)
    result = run_memctl("status", "--json", "--address", daemon.address)
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    for key in (
        "process",
        "managed",
        "unmanaged",
        "unmanaged_recent",
        "spilled",
        "memory_limit",
        "state",
    ):
        assert key in status, key
    assert status["memory_limit"] == 1 << 30
    assert status["managed"] == MiB
    assert status["state"] == "running"
    assert status["managed"] + status["unmanaged"] + status["unmanaged_recent"] == status["process"]
    assert status["thresholds"] == {"target": 0.6, "spill": 0.7, "pause": 0.8, "terminate": 0.95}
    assert status["scopes"][0]["name"] == "service"
    assert status["service"]["pid"] == daemon.pid


def test_status_text_is_readable(daemon: Daemon) -> None:
    result = run_memctl("status", env={"MEMCTL_ADDRESS": daemon.address, "NO_COLOR": "1"})
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "service" in text and "running" in text and "managed" in text
    assert "\x1b[" not in text  # no escape codes when not on a terminal


def test_put_get_evict_delete_keys(daemon: Daemon, tmp_path: Path) -> None:
    address = ["--address", daemon.address]
    put = run_memctl(
        "put",
        *address,
        "from-stdin",
        "-",
        input=b"hello",
    )
    assert put.returncode == 0, put.stderr
    assert b"stored 'from-stdin'" in put.stderr
    got = run_memctl("get", *address, "from-stdin")
    assert got.returncode == 0 and got.stdout == b"hello"
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert run_memctl("put", *address, "empty", str(empty)).returncode == 0
    assert run_memctl("get", *address, "empty").stdout == b""
    keys = run_memctl("keys", *address)
    assert keys.stdout.decode().splitlines() == ["empty\t0\tmemory", "from-stdin\t5\tmemory"]
    evict = run_memctl("evict", *address, "from-stdin")
    assert evict.returncode == 0 and b"moved 1 values" in evict.stdout
    assert b"from-stdin\t5\tdisk" in run_memctl("keys", *address).stdout
    delete = run_memctl("delete", *address, "from-stdin", "nope")
    assert delete.returncode == 0 and delete.stdout.strip() == b"deleted 1 of 2"
    missing = run_memctl("put", *address, "k", str(tmp_path / "does-not-exist"))
    assert missing.returncode == 2 and b"cannot read" in missing.stderr
    bad = run_memctl("put", *address, "", "-", input=b"x")
    assert bad.returncode == 1 and b"key is empty" in bad.stderr
    assert b"Traceback" not in bad.stderr


def test_unreachable_daemon_is_one_clear_line(tmp_path: Path) -> None:
    result = run_memctl("status", "--address", f"unix:{tmp_path}/nobody.sock", "--timeout", "5")
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "is `memctl serve` running?" in lines[0], lines


def test_trim_reports_rss(daemon: Daemon) -> None:
    result = run_memctl("trim", "--address", daemon.address)
    assert result.returncode == 0, result.stderr
    assert b"malloc_trim(0)" in result.stdout and b"RSS" in result.stdout
    with Client(daemon.address) as client:
        trimmed = client.trim()
    assert trimmed.supported and trimmed.rss_before > 0 and trimmed.rss_after > 0


def test_trim_under_jemalloc_says_so(spawn: Callable[..., Daemon]) -> None:
    assert JEMALLOC.exists(), "install Debian's libjemalloc2 (the test command does)"
    daemon = spawn(env={"LD_PRELOAD": str(JEMALLOC)})
    with Client(daemon.address) as client:
        result = client.trim()
    assert not result.supported
    assert "jemalloc" in result.detail and "not called" in result.detail
    cli = run_memctl("trim", "--address", daemon.address)
    assert cli.returncode == 1 and b"jemalloc" in cli.stdout


def test_config_prints_values_and_sources(tmp_path: Path) -> None:
    config = tmp_path / "memctl.yaml"
    config.write_text("memory:\n  target: 0.5\n  spill: false\n")
    result = run_memctl(
        "config",
        "--config",
        str(config),
        "--memory-limit",
        "2 GiB",
        "--json",
        env={"MEMCTL_MEMORY__PAUSE": "0.75"},
    )
    assert result.returncode == 0, result.stderr
    effective = json.loads(result.stdout)
    assert effective["memory.target"] == {"value": 0.5, "source": f"file {config}"}
    assert effective["memory.spill"]["value"] is False
    assert effective["memory.pause"] == {"value": 0.75, "source": "env MEMCTL_MEMORY__PAUSE"}
    assert effective["memory-limit"] == {"value": "2 GiB", "source": "flag --memory-limit"}
    assert effective["memory.terminate"] == {"value": 0.95, "source": "default"}
    text = run_memctl("config", "--config", str(config)).stdout.decode()
    assert any(
        line.startswith("memory.target") and "0.5" in line and "file" in line
        for line in text.splitlines()
    )


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--set", "memory.targte=0.5"], ["unknown key", "memory.targte"]),
        (["--set", "memory.pause=2"], ["memory.pause", "2"]),
        (["--set", "oops"], ["KEY=VALUE"]),
    ],
)
def test_config_errors_are_one_line_exit_2(args: list[str], words: list[str]) -> None:
    result = run_memctl("config", *args)
    assert result.returncode == 2
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    for word in words:
        assert word in lines[0], lines[0]
