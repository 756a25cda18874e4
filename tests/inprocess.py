"""A daemon inside the test's own event loop, through ``daemon.build_server``.

Faster than a ``memctl serve`` process and it exposes the parts (``server.core``,
``server.control``), while serving the very same gRPC surface on a unix socket.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc

from memctl_server.config import ServiceConfig, load_config
from memctl_server.daemon import MemctlServer, build_server
from memctl_server.edge import SERVICE as SERVICE_DESCRIPTOR
from tests.tokens import with_token

SERVICE = "/memctl.v1.MemctlService/"


def config(tmp_path: Path, **settings: str) -> ServiceConfig:
    """Defaults, on a socket and local directory in ``tmp_path``; ``settings`` are keys
    with ``__`` for ``.`` and ``_`` for ``-`` (``control__heartbeat_timeout="1s"``)."""
    overrides: dict[str, object] = {
        "address": f"unix:{tmp_path / 'memctl.sock'}",
        "local-directory": str(tmp_path / "local"),
    }
    for key, value in settings.items():
        overrides[key.replace("__", ".").replace("_", "-")] = value
    return load_config(environ={}, overrides=overrides).config


def channel_to(server: MemctlServer) -> grpc.aio.Channel:
    """A raw aio channel to ``server`` carrying its token, as a rightful client would."""
    token = server.authenticator.token
    return grpc.aio.insecure_channel(
        server.address, interceptors=with_token(token) if token else None
    )


@asynccontextmanager
async def serving(
    tmp_path: Path, **settings: str
) -> AsyncIterator[tuple[MemctlServer, grpc.aio.Channel]]:
    """A started in-process daemon (authentication on, as users run it) and an aio
    channel to it carrying the token; both closed at the end."""
    async with build_server(config(tmp_path, **settings)) as server, channel_to(server) as channel:
        yield server, channel


async def raw_call(channel: grpc.aio.Channel, name: str, *messages: bytes) -> list[bytes]:
    """Call method ``name`` with raw request bytes (no serializer); the raw responses."""
    method = SERVICE_DESCRIPTOR.methods_by_name[name]
    path = SERVICE + name
    if not method.client_streaming:
        (request,) = messages
        if method.server_streaming:
            return [r async for r in channel.unary_stream(path)(request, timeout=10)]
        return [await channel.unary_unary(path)(request, timeout=10)]
    if method.server_streaming:
        return [r async for r in channel.stream_stream(path)(iter(messages), timeout=10)]
    return [await channel.stream_unary(path)(iter(messages), timeout=10)]
