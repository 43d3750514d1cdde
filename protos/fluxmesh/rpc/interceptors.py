"""The one place where exceptions become gRPC statuses.

Handlers raise plain `FluxmeshError`s (or any exception); this interceptor wraps every unary
and server-streaming handler so the client sees the error's status and message, and a bug
shows up as INTERNAL with its message logged once, with the traceback.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from fluxmesh.rpc.errors import FluxmeshError

log = logging.getLogger(__name__)


async def _abort_with(context: grpc.aio.ServicerContext, method: str, error: Exception) -> None:
    if isinstance(error, FluxmeshError):
        log.info("%s -> %s: %s", method, error.code.name, error.message)
        await context.abort(error.code, error.message)
    log.exception("%s failed", method, exc_info=error)
    await context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")


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
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001 - mapped to a status, not swallowed
                    await _abort_with(context, method, error)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context) -> AsyncIterator:
                try:
                    async for response in inner_stream(request, context):
                        yield response
                except grpc.aio.AbortError:
                    raise
                except Exception as error:  # noqa: BLE001
                    await _abort_with(context, method, error)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler
