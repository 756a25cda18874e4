"""Total memory (RAM, cgroups, RLIMIT_RSS) and every form of memory limit in PRODUCT.md."""

from __future__ import annotations

import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from memctl_server.limits import (
    MEMORY_LIMIT_FORMS,
    check_memory_limit,
    resolve_memory_limit,
    total_memory,
    total_memory_with_source,
)

GiB = 2**30
TOTAL = 16 * GiB


def _host_total() -> tuple[int, str]:
    """What total memory is with no cgroup files: RAM, or RLIMIT_RSS if it is lower."""
    ram = psutil.virtual_memory().total
    hard = resource.getrlimit(resource.RLIMIT_RSS)[1]
    return (hard, "RLIMIT_RSS") if 0 < hard < ram else (ram, "RAM")


def _write(root: Path, name: str, text: str) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- total memory ----------------------------------------------------------------


def test_no_cgroup_files_means_ram(tmp_path: Path) -> None:
    assert total_memory_with_source(tmp_path) == _host_total()
    assert total_memory(tmp_path) == _host_total()[0]


@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux only")
@pytest.mark.parametrize(
    "name",
    [
        "memory/memory.limit_in_bytes",
        "memory/memory.soft_limit_in_bytes",
        "memory.max",
        "memory.high",
        "memory.low",
    ],
)
def test_each_cgroup_file_can_set_the_limit(tmp_path: Path, name: str) -> None:
    path = _write(tmp_path, name, f"{GiB}\n")
    assert total_memory_with_source(tmp_path) == (GiB, str(path))


@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux only")
def test_smallest_cgroup_value_wins(tmp_path: Path) -> None:
    _write(tmp_path, "memory.max", f"{3 * GiB}\n")
    _write(tmp_path, "memory.high", f"{2 * GiB}\n")
    low = _write(tmp_path, "memory.low", f"{GiB}\n")
    assert total_memory_with_source(tmp_path) == (GiB, str(low))


@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux only")
def test_max_zero_garbage_and_huge_values_are_skipped(tmp_path: Path) -> None:
    _write(tmp_path, "memory.max", "max\n")
    _write(tmp_path, "memory.high", "max\n")
    _write(tmp_path, "memory.low", "0\n")
    # cgroup v1 writes this when there is no limit; it is more than any host's RAM.
    _write(tmp_path, "memory/memory.limit_in_bytes", "9223372036854771712\n")
    _write(tmp_path, "memory/memory.soft_limit_in_bytes", "not a number\n")
    assert total_memory_with_source(tmp_path) == _host_total()


@pytest.mark.skipif(sys.platform != "linux", reason="cgroups are Linux only")
def test_unreadable_cgroup_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / "memory.max").mkdir()  # reading a directory fails, even as root
    high = _write(tmp_path, "memory.high", f"{2 * GiB}\n")
    assert total_memory_with_source(tmp_path) == (2 * GiB, str(high))


@pytest.mark.skipif(sys.platform == "win32", reason="no RLIMIT_RSS on Windows")
def test_rlimit_rss_caps_total_memory(tmp_path: Path) -> None:
    _write(tmp_path, "memory.max", f"{2 * GiB}\n")
    # Lowering a hard limit cannot be undone, so do it in a child process.
    code = (
        "import resource, sys\n"
        "from pathlib import Path\n"
        "from memctl_server.limits import total_memory_with_source\n"
        f"resource.setrlimit(resource.RLIMIT_RSS, ({GiB}, {GiB}))\n"
        "print(*total_memory_with_source(Path(sys.argv[1])))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.split() == [str(GiB), "RLIMIT_RSS"]


# --- memory limit ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("4 GiB", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("512MB", 512 * 10**6),
        (4e9, 4 * 10**9),
        ("4e9", 4 * 10**9),
        (4000000000, 4 * 10**9),
        ("4000000000.0", 4 * 10**9),
        (0.5, TOTAL // 2),
        ("0.5", TOTAL // 2),
        (0.25, TOTAL // 4),
        (1, TOTAL),
        ("1", TOTAL),
        (1.0, TOTAL),
        ("1.0", TOTAL),
    ],
)
def test_sizes_and_fractions(value: str | int | float, expected: int) -> None:
    assert resolve_memory_limit(value, total_memory=TOTAL) == expected


@pytest.mark.parametrize("value", [0, 0.0, "0", "0 B", None, "none", "None", False, "false"])
def test_no_limit(value: str | int | float | None) -> None:
    assert resolve_memory_limit(value, total_memory=TOTAL) is None


def test_auto_for_the_service_is_total_memory() -> None:
    assert resolve_memory_limit("auto", total_memory=TOTAL) == TOTAL
    assert resolve_memory_limit("AUTO", total_memory=TOTAL) == TOTAL


@pytest.mark.parametrize(
    ("nthreads", "total_nthreads", "expected"),
    [(2, 8, TOTAL // 4), (1, 3, TOTAL // 3), (8, 8, TOTAL), (16, 8, TOTAL)],
)
def test_auto_for_a_worker_is_its_share_of_threads(
    nthreads: int, total_nthreads: int, expected: int
) -> None:
    limit = resolve_memory_limit(
        "auto", total_memory=TOTAL, nthreads=nthreads, total_nthreads=total_nthreads
    )
    assert limit == expected


def test_auto_total_nthreads_defaults_to_cpu_count() -> None:
    cpus = os.cpu_count() or 1
    expected = int(TOTAL * min(1.0, 1 / cpus))
    assert resolve_memory_limit("auto", total_memory=TOTAL, nthreads=1) == expected


def test_auto_with_no_threads_is_an_error() -> None:
    with pytest.raises(ValueError, match="positive number of threads"):
        resolve_memory_limit("auto", total_memory=TOTAL, nthreads=0, total_nthreads=4)


def test_limit_above_total_memory_is_clamped_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="memctl_server.limits"):
        assert resolve_memory_limit("64 GiB", total_memory=TOTAL) == TOTAL
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert "64.00 GiB" in record.getMessage()
    assert "16.00 GiB" in record.getMessage()


def test_limit_within_total_memory_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="memctl_server.limits"):
        assert resolve_memory_limit("16 GiB", total_memory=TOTAL) == TOTAL
        assert resolve_memory_limit("auto", total_memory=TOTAL, nthreads=99) == TOTAL
    assert caplog.records == []


def test_not_understood_message() -> None:
    with pytest.raises(ValueError) as info:
        resolve_memory_limit("lots", total_memory=TOTAL)
    assert str(info.value) == (
        "memory limit 'lots' is not understood; use auto, a size like \"4 GiB\", "
        "a fraction of the host's memory like 0.5, or none"
    )


@pytest.mark.parametrize(
    "value", ["lots", "", "  ", "-1", -1, -0.5, "-4 GiB", "1.5", 1.5, float("nan"), True, "true"]
)
def test_bad_values(value: str | int | float) -> None:
    with pytest.raises(ValueError) as info:
        resolve_memory_limit(value, total_memory=TOTAL)
    assert str(info.value) == f"memory limit {value!r} is not understood; {MEMORY_LIMIT_FORMS}"


def test_check_memory_limit_accepts_every_form_without_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="memctl_server.limits"):
        for value in ("auto", "4 PiB", 4e9, 0.5, 1, 0, None, "none", False):
            check_memory_limit(value)
    assert caplog.records == []
    with pytest.raises(ValueError, match="not understood"):
        check_memory_limit("lots")
