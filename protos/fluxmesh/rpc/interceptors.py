"""The one place where exceptions become gRPC statuses.

Handlers raise plain `FluxmeshError`s (or any exception); this interceptor wraps every unary
and server-streaming handler so the client sees the error's status and message, and a bug
shows up as INTERNAL with its message logged once, with the traceback. A server that serves
callers who may not see its insides (the orchestrator's ordinary tenants) gives them a server
fault's code and request id only; the full message is in its log under that id.

It also answers the input no handler ever sees: bytes that are not a valid request message
(grpc would say UNKNOWN) and enum values the proto does not define (protobuf keeps them as
plain numbers) are INVALID_ARGUMENT naming the field, before the handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from fluxmesh.rpc import request_ids
from fluxmesh.rpc.errors import FluxmeshError, InvalidArgument, is_server_fault, public_error, rich_status
from fluxmesh.rpc.handlers import wrap_handler
from fluxmesh.rpc.validation import check_enums

log = logging.getLogger(__name__)


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception, *, disclose: bool) -> None:
    if _is_missing_method(error):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    known = error if isinstance(error, FluxmeshError) else FluxmeshError(f"{type(error).__name__}: {error}")
    hidden = not disclose and is_server_fault(known)
    if hidden and request_ids.current() is None:  # the id the caller quotes names the log line too
        request_ids.adopt(request_ids.new_request_id())
    if known is not error:
        log.exception("%s failed", method, exc_info=error)
    else:
        log.log(logging.WARNING if hidden else logging.INFO, "%s -> %s: %s", method, known.code.name, known.message)
    if hidden:
        known = public_error(known, request_ids.current() or "")
    if known.reason:
        await context.abort_with_status(rich_status(known))
    await context.abort(known.code, known.message)


def _is_missing_method(error: Exception) -> bool:
    """The generated base servicer's answer for a method nobody overrode, and only that: a
    NotImplementedError from anywhere else (torch has many: "isfinite" not implemented for
    'Float8_e4m3fn') is a bug or an unchecked input, INTERNAL and logged with its traceback."""
    if not isinstance(error, NotImplementedError):
        return False
    tb = error.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename.endswith("_pb2_grpc.py")


class Undecodable:
    """What a request that failed to parse becomes, so the handler wrapper can answer it."""

    __slots__ = ("message_type", "error")

    def __init__(self, message_type: str, error: Exception):
        self.message_type, self.error = message_type, error


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    name = getattr(getattr(owner, "DESCRIPTOR", None), "full_name", "request")

    def deserialize(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as error:
            return Undecodable(name, error)

    return deserialize


# Whether the caller of a call with this metadata may read the server's own failures in full.
Discloses = Callable[[Sequence[tuple[str, str | bytes]]], bool]


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    """`discloses`: whether a caller may read a server fault's details (exception text, stage
    addresses, paths); for the others they go to the log only, and the caller gets the request
    id that finds them. None: every caller may (a stage, whose one caller is the orchestrator)."""

    def __init__(self, discloses: Discloses | None = None):
        self._discloses = discloses

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        @asynccontextmanager
        async def mapped(request, context):
            try:
                if isinstance(request, Undecodable):
                    raise InvalidArgument("request", f"not a valid {request.message_type} message ({request.error})")
                if isinstance(request, Message):
                    check_enums(request)
                yield
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - mapped to a status, not swallowed
                disclose = self._discloses is None or self._discloses(context.invocation_metadata() or ())
                await _abort_with(context, method, error, disclose=disclose)

        return wrap_handler(handler, mapped, request_deserializer=_tolerant(handler.request_deserializer))
