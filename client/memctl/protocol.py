"""Rules of the wire contract that both ends check: key and metadata limits, chunking.

The client checks them to fail early with a ``ValueError``; the service checks them
again, because not every client is this one.
"""

from __future__ import annotations

#: Values travel in chunks of this size in Put and Get streams.
CHUNK_SIZE = 1 << 20
#: The largest value that travels whole in one message (PutMany, GetMany, Pipeline);
#: larger ones are streamed in chunks (Put, Get).
MAX_INLINE_VALUE = 1 << 20
#: The most value bytes one message carries either way (a GetMany answer, a Pipeline
#: message, a client's PutMany): under gRPC's default 4 MiB receive limit, which is
#: also the daemon's default limits.max-message-size.
MESSAGE_BUDGET = 3 << 20
MAX_KEY_BYTES = 4096
MAX_METADATA_BYTES = 64 * 1024
#: Call metadata naming the attached worker's session; data then goes to its scope.
SESSION_METADATA_KEY = "memctl-session"
#: Name of the service's own scope in Status.
SERVICE_SCOPE = "service"


def key_problem(key: str) -> str | None:
    """Why ``key`` is not a valid key, or None if it is."""
    if not isinstance(key, str):
        return f"keys are strings, not {type(key).__name__}"
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError:
        return f"key {key[:40]!r} is not valid UTF-8 (it contains a lone surrogate)"
    if size == 0:
        return "key is empty; use 1 to 4096 bytes of UTF-8"
    if size > MAX_KEY_BYTES:
        return f"key is {size} bytes long; the most is {MAX_KEY_BYTES} bytes of UTF-8"
    return None


def metadata_problem(metadata: bytes) -> str | None:
    """Why ``metadata`` cannot be stored, or None."""
    if len(metadata) > MAX_METADATA_BYTES:
        return (
            f"metadata is {len(metadata)} bytes; the most is {MAX_METADATA_BYTES} bytes "
            "(store large headers in the value itself)"
        )
    return None
