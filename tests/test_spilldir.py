"""Spill directories are locked for their daemon's life; a dead daemon's is reclaimed.

Real daemons, real SIGKILL: the kernel drops a dead process's flock, and that is
what tells the next daemon on the same local directory that the data is garbage.
"""

from __future__ import annotations

import os
import re
import signal
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from memctl import Client
from memctl.sizes import parse_bytes
from memctl_server.errors import StartupError
from memctl_server.spilldir import (
    LOCK_NAME,
    create_spill_directory,
    open_persistent_directory,
)
from tests.conftest import Daemon, run_memctl

MiB = 1 << 20


def spill_directory(daemon: Daemon) -> Path:
    with Client(daemon.address) as client:
        return Path(client.status().spill_directory)


def spill_some(daemon: Daemon) -> dict[str, bytes]:
    """Put incompressible values and move them all to disk."""
    values = {f"v{i}": os.urandom(2 * MiB) for i in range(3)}
    with Client(daemon.address) as client:
        for key, value in values.items():
            client.put(key, value)
        assert client.evict().values_moved == 3
        assert client.status().service.keys_on_disk == 3
    return values


def test_a_killed_daemons_spill_directory_is_reclaimed(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    local = tmp_path / "shared-local"
    dead = spawn("--local-directory", str(local))
    dead_directory = spill_directory(dead)
    spill_some(dead)
    dead.stop(signal.SIGKILL)
    assert dead_directory.exists()  # SIGKILL cleans nothing up
    survivor = spawn("--local-directory", str(local))
    assert not dead_directory.exists()
    (line,) = [line for line in survivor.log().splitlines() if "stale spill directory" in line]
    assert str(dead_directory) in line
    freed = re.search(r": (\d+\.\d+ \w+) freed$", line)
    assert freed, line
    assert parse_bytes(freed.group(1)) >= 6 * MiB
    assert spill_directory(survivor).exists()


def test_a_live_daemons_spill_directory_is_left_alone(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    local = tmp_path / "shared-local"
    first = spawn("--local-directory", str(local))
    values = spill_some(first)
    first_directory = spill_directory(first)
    second = spawn("--local-directory", str(local))
    assert first_directory.exists()
    assert "stale spill directory" not in second.log()
    with Client(first.address) as client:
        for key, value in values.items():
            assert client.get(key) == value  # read back from its own, untouched disk
    assert first.stop() == 0
    assert not first_directory.exists()  # a clean exit removes its own
    assert spill_directory(second).exists()


def test_new_spill_directories_are_private_and_locked(tmp_path: Path) -> None:
    legacy = tmp_path / "memctl-spill-legacy"  # an older memctl's: no lock file
    legacy.mkdir()
    (legacy / "data").write_bytes(b"x")
    persistent = open_persistent_directory(tmp_path)
    persistent.close(remove=False)
    spill = create_spill_directory(tmp_path)
    try:
        assert stat.S_IMODE(spill.path.stat().st_mode) == 0o700
        assert (spill.path / LOCK_NAME).read_text().strip() == str(os.getpid())
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
        # Neither one without a lock file nor the persistent directory is reclaimed.
        assert (legacy / "data").exists()
        assert persistent.path.exists()
    finally:
        spill.close(remove=True)
    assert not spill.path.exists()


def test_the_persistent_directory_has_one_daemon_at_a_time(tmp_path: Path) -> None:
    first = open_persistent_directory(tmp_path)
    assert first.path == tmp_path / "memctl-data"
    assert stat.S_IMODE(first.path.stat().st_mode) == 0o700
    with pytest.raises(StartupError) as info:
        open_persistent_directory(tmp_path)
    message = str(info.value)
    assert message.startswith(f"another memctl (pid {os.getpid()}) uses {first.path};")
    assert "\n" not in message
    (first.path / "kept").write_bytes(b"data")
    first.close(remove=False)
    again = open_persistent_directory(tmp_path)  # the owner is gone: free again
    assert (again.path / "kept").read_bytes() == b"data"
    again.close(remove=False)


def test_a_second_daemon_on_a_held_persistent_directory_fails_to_start(
    spawn: Callable[..., Daemon], tmp_path: Path
) -> None:
    local = tmp_path / "shared-local"
    first = spawn("--set", "persist=true", "--local-directory", str(local))
    result = run_memctl(
        "serve",
        "--set",
        "persist=true",
        "--local-directory",
        str(local),
        "--address",
        f"unix:{tmp_path / 'second.sock'}",
    )
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert lines[-1] == (
        f"memctl serve: another memctl (pid {first.pid}) uses {local / 'memctl-data'}; "
        "stop it, or give this one another --local-directory"
    )
    with Client(first.address) as client:
        client.put("k", b"v")
        assert client.get("k") == b"v"
