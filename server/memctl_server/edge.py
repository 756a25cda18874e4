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
* **A bounded number of calls at once** (``MAX_ACTIVE_CALLS``); past it a call gets
  RESOURCE_EXHAUSTED saying the daemon is busy, never a bare CANCELLED (see
  ``daemon.SERVER_OPTIONS`` for where gRPC itself would otherwise drop calls).
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

from memctl.v1 import memctl_pb2 as pb

from .errors import InvalidArgument

logger = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["MemctlService"]
#: Calls in progress at once (Attach streams included); more get RESOURCE_EXHAUSTED.
MAX_ACTIVE_CALLS = 10_000


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


async def _checked(
    requests: AsyncIterator[Message | Undecodable],
) -> AsyncIterator[Message]:
    async for request in requests:
        if isinstance(request, Undecodable):
            raise UndecodableMessage(request.reason)
        yield request


class _Gate:
    """Counts calls in progress; refuses past ``limit``."""

    def __init__(self, limit: int):
        self.limit = limit
        self.active = 0

    async def enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if self.active >= self.limit:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"memctl is busy: {self.active} calls in progress, the most it serves at "
                "once; retry in a moment",
            )
        self.active += 1


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
            await gate.enter(context)
            try:
                async for response in behaviour(prepare(request), context):
                    yield response
            except UndecodableMessage as exc:
                await _refuse(context, exc)
            finally:
                gate.active -= 1

        return streaming

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await gate.enter(context)
        try:
            return await behaviour(prepare(request), context)
        except UndecodableMessage as exc:
            await _refuse(context, exc)
            raise AssertionError("unreachable: abort raises") from exc
        finally:
            gate.active -= 1

    return unary


def add_memctl_service(
    server: grpc.aio.Server, servicer: Any, max_active_calls: int = MAX_ACTIVE_CALLS
) -> None:
    """Register ``servicer``'s methods, as the generated ``add_…_to_server`` does, with
    our deserializers and wrappers."""
    gate = _Gate(max_active_calls)
    factories = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {}
    for method in SERVICE.methods:
        streaming = (method.client_streaming, method.server_streaming)
        handlers[method.name] = factories[streaming](
            _wrap(getattr(servicer, method.name), method.client_streaming, gate),
            request_deserializer=_deserializer(GetMessageClass(method.input_type)),
            response_serializer=GetMessageClass(method.output_type).SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
