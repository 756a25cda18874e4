"""One row of the suite's table: a figure for memctl beside the same figure for a peer."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Row:
    """``memctl`` and ``peer`` are the same measure (``metric``) of one workload.

    ``ratio`` is how much better memctl does than the peer: above 1 is better,
    whichever way the metric runs (ops/s up, latency down).
    """

    workload: str
    metric: str
    memctl: float
    peer: float | None = None
    #: "redis", "raw file", "memory copy", or "target" for a figure judged
    #: against a goal rather than a peer.
    peer_name: str = ""
    higher_is_better: bool = True

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer == 0 or self.memctl == 0:
            return None
        if self.higher_is_better:
            return self.memctl / self.peer
        return self.peer / self.memctl

    def as_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}
