"""Wrap a gRPC method handler so that code runs around every call, whatever the handler's shape.

grpc.aio handlers come in several shapes: unary coroutines, server-streaming async generators,
and server-streaming coroutines that write with `context.write` (grpc's own Health.Watch).
Interceptors that wrap only the first two break the third, so every fluxmesh interceptor that
needs to run code around a call goes through `wrap_handler`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import grpc

# around(request, context) -> an async context manager entered for the whole call.
Around = Callable[[Any, grpc.aio.ServicerContext], AbstractAsyncContextManager]


def wrap_handler(
    handler: grpc.RpcMethodHandler | None,
    around: Around,
    *,
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler | None:
    """`handler` with `around` entered for each unary or server-streaming call (others untouched)."""
    if handler is None:
        return None
    deserializer = request_deserializer or handler.request_deserializer
    if handler.unary_unary is not None:
        inner = handler.unary_unary

        async def unary_unary(request, context):
            async with around(request, context):
                result = inner(request, context)
                return await result if inspect.isawaitable(result) else result

        return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, handler.response_serializer)
    if handler.unary_stream is not None:
        inner_stream = handler.unary_stream
        if inspect.isasyncgenfunction(inner_stream):

            async def unary_stream(request, context):
                async with around(request, context):
                    async for response in inner_stream(request, context):
                        yield response

        else:  # writes its responses with context.write and returns

            async def unary_stream(request, context):
                async with around(request, context):
                    result = inner_stream(request, context)
                    if inspect.isawaitable(result):
                        await result

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, handler.response_serializer)
    return handler
