"""One row of the suite's table: a figure for memctl beside the same figure for a peer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """``memctl`` and ``peer`` are the same measure (``metric``) of one workload.

    ``ratio`` is how much better memctl does than the peer: above 1 is better,
    whichever way the metric runs (ops/s up, latency down).

    ``target``, when given, is the ratio the row is judged against instead of 1
    (say 1.5: memctl should do 1.5 times as well as Redis); with ``target_max`` too,
    the ratio should lie between the two (a figure that should match its peer, not
    beat it).
    """

    workload: str
    metric: str
    memctl: float
    peer: float | None = None
    #: "redis", "raw file", "memory copy", or "target" for a figure judged
    #: against a goal rather than a peer.
    peer_name: str = ""
    higher_is_better: bool = True
    target: float | None = None
    target_max: float | None = None

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer == 0 or self.memctl == 0:
            return None
        if self.higher_is_better:
            return self.memctl / self.peer
        return self.peer / self.memctl

    @property
    def met(self) -> bool | None:
        """Whether the ratio reaches its target (1 when none is given); None without
        a ratio."""
        ratio = self.ratio
        if ratio is None:
            return None
        low = 1.0 if self.target is None else self.target
        return ratio >= low and (self.target_max is None or ratio <= self.target_max)

    @property
    def target_text(self) -> str:
        """The target as the table shows it: "≥ 1.5", "0.95-1.05", or ""."""
        if self.target is None:
            return ""
        if self.target_max is None:
            return f">= {self.target:g}"
        return f"{self.target:g}-{self.target_max:g}"

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio, "met": self.met}
