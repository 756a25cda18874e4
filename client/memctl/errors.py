"""Exceptions the client raises, translated from gRPC status codes in one place.

A missing key raises the built-in ``KeyError``; bad input raises ``ValueError``
(``InvalidArgument`` is both a ``MemctlError`` and a ``ValueError``).
"""

from __future__ import annotations

import grpc


class MemctlError(Exception):
    """An error reported by the memctl service; ``code`` is the gRPC status code."""

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.code = code


class InvalidArgument(MemctlError, ValueError):
    """The service rejected the request's content."""


class ResourceExhausted(MemctlError):
    """Neither RAM nor disk may take the value."""


class FailedPrecondition(MemctlError):
    """The request does not fit the service's current state."""


class DataLoss(MemctlError):
    """A value was damaged: its spill file on the service, or the bytes on the way.

    The service drops a value it finds damaged; put it again.
    """


class Unauthenticated(MemctlError, PermissionError):
    """The service did not accept the call's token (none, or not the daemon's)."""


class PermissionDenied(MemctlError, PermissionError):
    """The token is valid but does not allow this: a worker token reaches only its
    own worker's data; other scopes and admin calls need the daemon's own token."""


class ServiceUnavailable(MemctlError, ConnectionError):
    """The service cannot be reached (not running, wrong address) or the deadline passed."""


_BY_CODE: dict[grpc.StatusCode, type[MemctlError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.RESOURCE_EXHAUSTED: ResourceExhausted,
    grpc.StatusCode.FAILED_PRECONDITION: FailedPrecondition,
    grpc.StatusCode.DATA_LOSS: DataLoss,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: ServiceUnavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: ServiceUnavailable,
}


_CODE_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}


def status_of(error: grpc.RpcError) -> tuple[grpc.StatusCode, str | None]:
    """A failed call's status code and message.

    A streaming call raises its own call object, whose traceback leads back to it
    (through the call's ``__next__`` frame): a reference cycle that only the cycle
    collector frees, perhaps at interpreter exit, when the call's ``__del__`` waits
    for a lock that a gRPC thread, stopped by the exit, may hold; the process then
    never exits. Reading the status here cuts that traceback, so every error this
    client handles is freed as soon as it is dropped.
    """
    error.__traceback__ = None
    return error.code(), error.details()


def translate(error: grpc.RpcError, address: str, key: str | None = None) -> Exception:
    """The exception to raise for a failed call; ``KeyError`` for NOT_FOUND."""
    return from_status(*status_of(error), address, key)


def status_code(number: int) -> grpc.StatusCode:
    """The status code numbered ``number`` (google.rpc.Code), UNKNOWN for none."""
    return _CODE_BY_NUMBER.get(number, grpc.StatusCode.UNKNOWN)


def from_failure(number: int, message: str, address: str, key: str | None = None) -> Exception:
    """The exception for one operation's failure inside a call (``memctl.v1.Failure``)."""
    return from_status(status_code(number), message, address, key)


def from_status(
    code: grpc.StatusCode, details: str | None, address: str, key: str | None = None
) -> Exception:
    """The exception for a status code and its message."""
    details = details or code.name
    if code == grpc.StatusCode.NOT_FOUND:
        return KeyError(key if key is not None else details)
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"cannot reach memctl at {address} ({details}); is `memctl serve` running?"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"memctl at {address} did not answer in time; raise the client's timeout"
    return _BY_CODE.get(code, MemctlError)(details, code)
