"""Raw gRPC channels that carry the daemon's token, as the memctl clients' calls do.

Tests that speak the wire contract directly (bad input, fuzzing, hand-built
streams) use these, so that they run with authentication on, as users do.
"""

from __future__ import annotations

from collections import namedtuple
from typing import Any

import grpc

from memctl.auth import AUTHORIZATION_METADATA_KEY, bearer, find_token


class _AddsMetadata:
    """Adds ``items`` to the metadata of every call of an aio channel."""

    def __init__(self, *items: tuple[str, str]):
        self.items = items

    def _details(self, details: Any) -> Any:
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            grpc.aio.Metadata(*(details.metadata or ()), *self.items),
            details.credentials,
            details.wait_for_ready,
        )


# grpc.aio files each interceptor under the first of the four kinds it is an instance
# of, so one class per kind.
class _UnaryUnary(_AddsMetadata, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _UnaryStream(_AddsMetadata, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._details(details), request)


class _StreamUnary(_AddsMetadata, grpc.aio.StreamUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


class _StreamStream(_AddsMetadata, grpc.aio.StreamStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return await continuation(self._details(details), requests)


def sending(*items: tuple[str, str]) -> list[Any]:
    """aio interceptors adding ``items`` to every call's metadata."""
    return [kind(*items) for kind in (_UnaryUnary, _UnaryStream, _StreamUnary, _StreamStream)]


def with_token(token: str) -> list[Any]:
    """aio interceptors adding ``authorization: Bearer <token>`` to every call."""
    return sending((AUTHORIZATION_METADATA_KEY, bearer(token)))


_Details = namedtuple(
    "_Details", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression")
)


class _CallDetails(_Details, grpc.ClientCallDetails):  # type: ignore[misc]
    pass


class SyncWithToken(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[misc]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[misc]
    grpc.StreamUnaryClientInterceptor,  # type: ignore[misc]
    grpc.StreamStreamClientInterceptor,  # type: ignore[misc]
):
    """Adds ``authorization: Bearer <token>`` to every call of a blocking channel."""

    def __init__(self, token: str):
        self.item = (AUTHORIZATION_METADATA_KEY, bearer(token))

    def _details(self, d: Any) -> Any:
        metadata = (*(d.metadata or ()), self.item)
        return _CallDetails(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression
        )

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation: Any, details: Any, requests: Any) -> Any:
        return continuation(self._details(details), requests)


def token_of(address: str) -> str:
    """The token of the daemon at ``address``, found as a client of its user finds it."""
    token: str | None = find_token(address).token
    assert token is not None, f"no token file found for {address}"
    return token


def raw_channel(address: str) -> grpc.Channel:
    """A blocking channel to the daemon at ``address``, carrying its token."""
    return grpc.intercept_channel(grpc.insecure_channel(address), SyncWithToken(token_of(address)))


def raw_aio_channel(address: str) -> grpc.aio.Channel:
    """An aio channel to the daemon at ``address``, carrying its token."""
    return grpc.aio.insecure_channel(address, interceptors=with_token(token_of(address)))
