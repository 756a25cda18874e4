"""Errors the domain raises for bad input, each mapped to one gRPC status code.

The domain never imports grpc; ``service.py`` translates these in one place.
Every message says what was wrong and what to do about it.
"""

from __future__ import annotations


class MemctlError(Exception):
    """Base class; ``code`` names the gRPC status code (``grpc.StatusCode`` member)."""

    code = "INTERNAL"


class InvalidArgument(MemctlError):
    code = "INVALID_ARGUMENT"


class NotFound(MemctlError):
    code = "NOT_FOUND"


class ResourceExhausted(MemctlError):
    code = "RESOURCE_EXHAUSTED"


class FailedPrecondition(MemctlError):
    code = "FAILED_PRECONDITION"


class PermissionDenied(MemctlError):
    """The caller's token does not allow this (a worker token outside its own scope)."""

    code = "PERMISSION_DENIED"


class DataLoss(MemctlError):
    """A stored value was found damaged (its spill file corrupt, truncated or gone)."""

    code = "DATA_LOSS"


class DeadlineExceeded(MemctlError):
    code = "DEADLINE_EXCEEDED"


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do (exit code 1)."""
