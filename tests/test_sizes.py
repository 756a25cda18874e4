"""Byte sizes and durations as users write them (Dask's parse_bytes semantics)."""

from __future__ import annotations

import pytest

from memctl.sizes import format_bytes, parse_bytes, parse_duration

GiB = 2**30


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4 GiB", 4 * GiB),
        ("4GiB", 4 * GiB),
        ("4 gib", 4 * GiB),
        ("512MB", 512 * 10**6),
        ("512 mb", 512 * 10**6),
        ("4e9", 4 * 10**9),
        ("4e9 B", 4 * 10**9),
        ("100", 100),
        ("1.5 kB", 1500),
        ("1.5 KiB", 1536),
        ("5 B", 5),
        ("  7  ", 7),
        (".5 kB", 500),
        ("2 k", 2000),
        ("3 Mi", 3 * 2**20),
        ("1 TB", 10**12),
        ("1 PiB", 2**50),
        ("0", 0),
        (4 * GiB, 4 * GiB),
        (4e9, 4 * 10**9),
        (12.9, 12),
    ],
)
def test_parse_bytes(text: str | int | float, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "text",
    ["lots", "", "MB", "-1", "-4 GiB", "4 XB", "4 GB GB", "1,000", "nan", "inf", "4 GiB!"],
)
def test_parse_bytes_rejects_text(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_bytes(text)
    message = str(info.value)
    assert repr(text) in message
    assert "4 GiB" in message and "KiB" in message


@pytest.mark.parametrize("value", [-1, -0.5, float("nan"), float("inf"), True, False])
def test_parse_bytes_rejects_numbers(value: int | float) -> None:
    with pytest.raises(ValueError, match="as a byte size"):
        parse_bytes(value)


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "0 B"),
        (17, "17 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (512 * 2**20, "512.00 MiB"),
        (4 * GiB, "4.00 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (2 * 2**50, "2.00 PiB"),
        (2**60, "1024.00 PiB"),
        (-2048, "-2.00 KiB"),
    ],
)
def test_format_bytes(n: int, expected: str) -> None:
    assert format_bytes(n) == expected


def test_format_then_parse_round_trips() -> None:
    for n in (0, 17, 1024, 3 * 2**20, 5 * GiB, 7 * 2**40):
        assert parse_bytes(format_bytes(n)) == n


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("200ms", 0.2),
        ("200 ms", 0.2),
        ("0.2s", 0.2),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2 min", 120.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("10us", 1e-5),
        ("30", 30.0),
        ("0", 0.0),
        (5, 5.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: str | int | float, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["fast", "", "-1s", "5 parsecs", "s", -1, float("nan"), True])
def test_parse_duration_rejects(value: str | int | float) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert repr(value) in str(info.value)
    assert "200ms" in str(info.value)
