"""The one place where exceptions become gRPC statuses.

Handlers raise plain `FluxmeshError`s (or any exception); this interceptor wraps every unary
and server-streaming handler so the client sees the error's status and message, and a bug
shows up as INTERNAL with its message logged once, with the traceback.

It also answers the input no handler ever sees: bytes that are not a valid request message
(grpc would say UNKNOWN) and enum values the proto does not define (protobuf keeps them as
plain numbers) are INVALID_ARGUMENT naming the field, before the handler runs.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from fluxmesh.rpc.errors import FluxmeshError, InvalidArgument, rich_status
from fluxmesh.rpc.handlers import wrap_handler
from fluxmesh.rpc.validation import check_enums

log = logging.getLogger(__name__)


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    if isinstance(error, FluxmeshError):
        log.info("%s -> %s: %s", method, error.code.name, error.message)
        if error.reason:
            await context.abort_with_status(rich_status(error))
        await context.abort(error.code, error.message)
    if _is_missing_method(error):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{method} is not implemented by this server")
    log.exception("%s failed", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


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


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
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
                await _abort_with(context, method, error)

        return wrap_handler(handler, mapped, request_deserializer=_tolerant(handler.request_deserializer))
