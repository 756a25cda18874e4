"""Byte sizes and durations as people write them, shared by the client and the service.

``parse_bytes`` follows ``dask.utils.parse_bytes`` ("4 GiB", "512MB", "4e9", 100;
decimal kB/MB/GB/TB/PB and binary KiB/MiB/GiB/TiB/PiB, case-insensitive), so a
Dask user's settings mean the same here. Unlike Dask, text without a number
("MB") and negative sizes are errors rather than guesses. ``format_bytes`` prints
binary units, as Dask's dashboard does. ``parse_duration`` reads the
``monitor-interval`` style of durations ("200ms", "30s", "5m").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

#: A decimal number, as in "4", "1.5", ".5" or "4e9" ("inf" and "nan" are not amounts).
_NUMBER = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_AMOUNT = re.compile(rf"\s*({_NUMBER})\s*([A-Za-z]*)\s*")

_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}
_BINARY = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "pi": 2**50}
#: Lower-cased unit → bytes. As in Dask, "k" and "kb" are kilobytes and "ki" and
#: "kib" kibibytes; the letters are case-insensitive, so "mb" is a megabyte.
_BYTE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    **_DECIMAL,
    **{prefix + "b": size for prefix, size in _DECIMAL.items()},
    **_BINARY,
    **{prefix + "b": size for prefix, size in _BINARY.items()},
}
_BYTE_FORMS = (
    "use a number of bytes with an optional unit, like 4 GiB, 512 MB, 1.5 kB, 4e9 or 100 "
    "(units: B, kB, MB, GB, TB, PB, KiB, MiB, GiB, TiB, PiB)"
)

_PRINTED_UNITS = (("PiB", 2**50), ("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))

_SECONDS_PER_UNIT: dict[str, float] = {
    "": 1.0,
    "us": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "seconds": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "minutes": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "hours": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
    "days": 86400.0,
}
_DURATION_FORMS = "use a duration like 200ms, 0.5s, 30s, 5m or 1h, or a number of seconds"


def _amount(value: str | int | float, units: Mapping[str, float]) -> float | None:
    """The number ``value`` stands for in base units, or None if it is not understood."""
    if isinstance(value, bool):
        # bool is an int; "True bytes" is a mistake, not a size.
        return None
    if isinstance(value, int | float):
        amount = float(value)
    else:
        match = _AMOUNT.fullmatch(value)
        if match is None or match.group(2).lower() not in units:
            return None
        amount = float(match.group(1)) * units[match.group(2).lower()]
    if not math.isfinite(amount) or amount < 0:
        return None
    return amount


def parse_bytes(value: str | int | float) -> int:
    """Bytes in ``value``: an int or float, or text like "4 GiB", "512MB", "4e9"."""
    amount = _amount(value, _BYTE_UNITS)
    if amount is None:
        raise ValueError(f"could not interpret {value!r} as a byte size; {_BYTE_FORMS}")
    return int(amount)


def format_bytes(n: int) -> str:
    """``n`` bytes in binary units with two decimals ("4.00 GiB"), or "17 B" below 1 KiB."""
    if n < 0:
        # Differences (RSS before minus after a trim) can be negative.
        return "-" + format_bytes(-n)
    for unit, size in _PRINTED_UNITS:
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def parse_duration(value: str | int | float) -> float:
    """Seconds in ``value``: a number of seconds, or text like "200ms", "30s", "5m", "1h"."""
    amount = _amount(value, _SECONDS_PER_UNIT)
    if amount is None:
        raise ValueError(f"could not interpret {value!r} as a duration; {_DURATION_FORMS}")
    return amount
