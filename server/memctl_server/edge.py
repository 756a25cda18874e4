"""Where calls enter ``memctl.v1.MemctlService``, before ``service.py`` sees them.

Two rules for every method, kept here so that no servicer method can forget them:

* **Undecodable requests are INVALID_ARGUMENT.** grpc's aio server runs the request
  deserializer itself, outside the servicer, and answers whatever it raises with
  UNKNOWN "Unexpected <class DecodeError>" (``_handle_exceptions`` in grpc's
  ``aio/server.pyx.pxi``). So our deserializers never raise: bytes that do not
  parse (garbage, or a proto3 string holding invalid UTF-8) become an
  ``Undecodable`` marker, and the wrapper around each servicer method turns it into
  INVALID_ARGUMENT with one line naming the message type and what was wrong — for a
  unary request before the method runs, for a streamed one (Put, Attach) at the
  point the servicer reads the bad message.
* **A bounded number of calls at once**, in total (``limits.max-calls``) and per
  client (``limits.max-calls-per-client``); past either a call gets
  RESOURCE_EXHAUSTED saying so, never a bare CANCELLED (see
  ``daemon.SERVER_OPTIONS`` for where gRPC itself would otherwise drop calls). A
  client is what its ``memctl-client`` call metadata names (one ``memctl.Client``),
  else its connection.

Put's chunks reach the servicer as views of the bytes received and Get's leave it
already encoded (``memctl.chunks``), so protobuf does not copy a value's bytes on the way.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message
from google.protobuf.message_factory import GetMessageClass

from memctl.auth import CLIENT_METADATA_KEY
from memctl.chunks import chunk_payload
from memctl.v1 import memctl_pb2 as pb

from .errors import InvalidArgument

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["MemctlService"]


@dataclass(frozen=True)
class Undecodable:
    """What the deserializer returns for bytes that are not a valid request."""

    reason: str


class UndecodableMessage(InvalidArgument):
    """A streamed request message did not decode; raised where the servicer reads it."""


def _deserializer(message_class: type[Message]) -> Callable[[bytes], Message | Undecodable]:
    name = message_class.DESCRIPTOR.full_name

    def deserialize(raw: bytes) -> Message | Undecodable:
        try:
            return message_class.FromString(raw)
        except DecodeError as exc:
            # upb says "Error parsing message with type 'X': <what>"; keep the what.
            what = str(exc).rpartition(": ")[2] or "it does not parse"
            return Undecodable(f"the request is not a valid {name} message: {what}")

    return deserialize


def _put_deserializer() -> Callable[[bytes], Message | memoryview | Undecodable]:
    """Put's chunks as views of the bytes received (``memctl.chunks``), other messages
    as ``_deserializer`` decodes them."""
    deserialize = _deserializer(pb.PutRequest)

    def put_message(raw: bytes) -> Message | memoryview | Undecodable:
        payload = chunk_payload(raw)
        return deserialize(raw) if payload is None else payload

    return put_message


def _get_serializer(message: Message | bytes) -> bytes:
    """Get's chunks arrive encoded (``memctl.chunks``); its header is a message."""
    return message if isinstance(message, bytes) else message.SerializeToString()


async def _checked(
    requests: AsyncIterator[Message | memoryview | Undecodable],
) -> AsyncIterator[Message | memoryview]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableMessage(request.reason)
        yield request


def rewrap(
    handler: grpc.RpcMethodHandler, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]
) -> grpc.RpcMethodHandler:
    """``handler`` with its behaviour (whichever of the four kinds it is) wrapped, for
    server interceptors."""
    for kind in ("unary_unary", "unary_stream", "stream_unary", "stream_stream"):
        behaviour = getattr(handler, kind)
        if behaviour is not None:
            return handler._replace(**{kind: wrap(behaviour)})
    return handler


def metadata_value(context: grpc.aio.ServicerContext[Any, Any], name: str) -> str | None:
    """The call metadata ``name``'s value, if the call carries it."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return str(value)
    return None


def client_of(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """Which client a call comes from, for per-client limits."""
    named = metadata_value(context, CLIENT_METADATA_KEY)
    return f"client {named[:64]}" if named is not None else str(context.peer())


class _Gate:
    """Counts calls in progress, in total and per client; refuses past either limit."""

    def __init__(self, limit: int, per_client: int):
        self.limit = limit
        self.per_client = per_client
        self.active = 0
        self.by_client: dict[str, int] = {}

    async def enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """Count the call in; the client to ``leave`` with."""
        client = client_of(context)
        if self.active >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"memctl is busy: {self.active} calls in progress, the most it serves at "
                "once (limits.max-calls); retry in a moment",
            )
        mine = self.by_client.get(client, 0)
        if mine >= self.per_client:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this client has {mine} calls in progress, the most one client may have "
                "(limits.max-calls-per-client); wait for some to finish, or spread the "
                "work over more clients",
            )
        self.active += 1
        self.by_client[client] = mine + 1
        return client

    def leave(self, client: str) -> None:
        self.active -= 1
        left = self.by_client[client] - 1
        if left:
            self.by_client[client] = left
        else:
            del self.by_client[client]


async def _refuse(context: grpc.aio.ServicerContext[Any, Any], error: InvalidArgument) -> None:
    """INVALID_ARGUMENT for an undecodable message the servicer did not turn into a status."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))


def _wrap(
    behaviour: Callable[..., Any], streaming_request: bool, gate: _Gate
) -> Callable[..., Any]:
    """``behaviour`` with the two rules applied, of the same kind (grpc inspects it)."""

    def prepare(request: Any) -> Any:
        if streaming_request:
            return _checked(request)
        if isinstance(request, Undecodable):
            raise UndecodableMessage(request.reason)
        return request

    if inspect.isasyncgenfunction(behaviour):

        async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
            client = await gate.enter(context)
            try:
                async for response in behaviour(prepare(request), context):
                    yield response
            except UndecodableMessage as exc:
                await _refuse(context, exc)
            finally:
                gate.leave(client)

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        client = await gate.enter(context)
        try:
            return await behaviour(prepare(request), context)
        except UndecodableMessage as exc:
            await _refuse(context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        finally:
            gate.leave(client)

    return unary


def add_memctl_service(
    server: grpc.aio.Server, servicer: Any, *, max_calls: int, max_calls_per_client: int
) -> None:
    """Register ``servicer``'s methods, as the generated ``add_…_to_server`` does, with
    our deserializers and wrappers."""
    gate = _Gate(max_calls, max_calls_per_client)
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    # The large-value methods pass chunks through undecoded (memctl.chunks).
    deserializers: dict[str, Callable[[bytes], Any]] = {"Put": _put_deserializer()}
    serializers: dict[str, Callable[[Any], bytes]] = {"Get": _get_serializer}
    handlers = {}
    for method in SERVICE.methods:
        streaming = (method.client_streaming, method.server_streaming)
        handlers[method.name] = factories[streaming](
            _wrap(getattr(servicer, method.name), method.client_streaming, gate),
            request_deserializer=deserializers.get(
                method.name, _deserializer(GetMessageClass(method.input_type))
            ),
            response_serializer=serializers.get(
                method.name, GetMessageClass(method.output_type).SerializeToString
            ),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
