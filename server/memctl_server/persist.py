"""Restart without loss (``persist: true``): find the values again, count what is gone.

Spill files describe themselves (scope, key, metadata, checksum: ``spillfile.py``),
so a daemon started on the same directory finds every value that reached disk by
reading the files' headers. At SIGTERM the daemon writes every value still in RAM
to disk first, so a clean restart loses nothing.

After SIGKILL (or a crash) the values that were only in RAM are gone. To say how
many, a journal records every value acknowledged (``+``) and removed (``-``), one
small append per Put or Delete: the keys it still lists that no file holds are the
lost ones, reported in one log line with their count. The journal is rewritten from
what was found at each start, and when it has grown to several times the live keys.

Like the store, these run on the store thread only. Not covered: where the
directory is and its lock (``daemon.py``).
"""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .spillfile import SUFFIX, TEMP_SUFFIX, FileHeader, SpillFileDamaged, scan_header

logger = logging.getLogger(__name__)

JOURNAL = "journal"
#: Rewrite the journal once it holds this many times the live keys (plus a floor).
_COMPACT_FACTOR, _COMPACT_FLOOR = 4, 10_000


@dataclass(frozen=True)
class FoundFile:
    path: str
    disk_size: int
    header: FileHeader


@dataclass
class Recovered:
    """What a start with ``persist: true`` found on disk."""

    #: scope name -> key -> its newest spill file.
    scopes: dict[str, dict[str, FoundFile]] = field(default_factory=lambda: defaultdict(dict))
    #: Files that could not be trusted (bad header), removed.
    damaged: int = 0
    #: Values the journal lists that no file holds: they were only in RAM.
    lost: int = 0

    @property
    def values(self) -> int:
        return sum(len(keys) for keys in self.scopes.values())


def find_values(directory: Path) -> Recovered:
    """Read the headers of every spill file under ``directory``; remove half-written
    and damaged files, and older copies of a value written twice."""
    recovered = Recovered()
    newest: dict[tuple[str, str], int] = {}
    for path in sorted(directory.glob("*/*")):
        name = str(path)
        if name.endswith(TEMP_SUFFIX):
            path.unlink(missing_ok=True)  # a Put or spill cut short: never acknowledged
            continue
        if not name.endswith(SUFFIX):
            continue
        try:
            header = scan_header(name)
            stat = path.stat()
        except (SpillFileDamaged, OSError) as exc:
            logger.warning("Removing spill file %s: %s", name, exc)
            path.unlink(missing_ok=True)
            recovered.damaged += 1
            continue
        where = (header.scope, header.key)
        earlier = recovered.scopes[header.scope].get(header.key)
        if earlier is not None:
            # Killed between writing a value's new file and removing the old one.
            if newest[where] > stat.st_mtime_ns:
                path.unlink(missing_ok=True)
                continue
            os.remove(earlier.path)
        newest[where] = stat.st_mtime_ns
        recovered.scopes[header.scope][header.key] = FoundFile(name, stat.st_size, header)
    for sub in directory.iterdir():
        if sub.is_dir() and not any(sub.iterdir()):
            sub.rmdir()
    return recovered


class Journal:
    """Append-only record of the values acknowledged and removed, for counting losses.

    ``live_values`` lists the values stored now, for rewriting the journal when it has
    grown to several times their number.
    """

    def __init__(self, directory: Path, live_values: Callable[[], set[tuple[str, str]]]):
        self.path = directory / JOURNAL
        self._live_values = live_values
        self._fd = -1
        self._records = 0
        self._live = 0

    def replay(self) -> set[tuple[str, str]]:
        """The (scope, key) pairs the journal says were stored when it was last written."""
        live: set[tuple[str, str]] = set()
        try:
            lines = self.path.read_bytes().splitlines()
        except FileNotFoundError:
            return live
        for line in lines:
            try:
                op, scope, key = json.loads(line)
            except (ValueError, TypeError):
                continue  # a line cut short by the kill
            if op == "+":
                live.add((scope, key))
            else:
                live.discard((scope, key))
        return live

    def rewrite(self, live: set[tuple[str, str]]) -> None:
        """Start the journal afresh from the values that exist now."""
        self.close()
        temp = self.path.with_suffix(".tmp")
        with temp.open("wb") as fh:
            fh.writelines(_line("+", scope, key) for scope, key in sorted(live))
        os.chmod(temp, 0o600)
        os.replace(temp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._records = self._live = len(live)

    def added(self, scope: str, key: str, *, new: bool) -> None:
        self._live += new
        self._append(_line("+", scope, key))

    def removed(self, scope: str, key: str) -> None:
        self._live -= 1
        self._append(_line("-", scope, key))

    def _append(self, line: bytes) -> None:
        # One write(2) per record, unbuffered: it survives the process being killed.
        os.write(self._fd, line)
        self._records += 1
        if self._records > _COMPACT_FACTOR * self._live + _COMPACT_FLOOR:
            self.rewrite(self._live_values())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _line(op: str, scope: str, key: str) -> bytes:
    return json.dumps([op, scope, key]).encode() + b"\n"


def count_lost(recovered: Recovered, journal: Journal) -> None:
    """Count the values the journal lists that no spill file holds."""
    found = {(scope, key) for scope, keys in recovered.scopes.items() for key in keys}
    recovered.lost = len(journal.replay() - found)
