"""memctl: a per-host memory-control service, and the client to use it.

>>> from memctl import Client
>>> with Client() as client:            # MEMCTL_ADDRESS or 127.0.0.1:7075
...     client.put("x", b"data")
...     client.get("x")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .aio import AsyncClient
from .client import Client
from .errors import MemctlError, ServiceUnavailable
from .mapping import MemctlMapping
from .results import (
    EventRecord,
    EvictResult,
    KeyInfo,
    PutResult,
    ScopeStatus,
    Status,
    StoredValue,
    TrimResult,
)
from .worker import Command, SessionInfo, WorkerSession

__all__ = [
    "AsyncClient",
    "Client",
    "Command",
    "EventRecord",
    "EvictResult",
    "KeyInfo",
    "MemctlError",
    "MemctlMapping",
    "PutResult",
    "ScopeStatus",
    "ServiceUnavailable",
    "SessionInfo",
    "Status",
    "StoredValue",
    "TrimResult",
    "WorkerSession",
    "__version__",
]
