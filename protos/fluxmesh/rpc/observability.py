"""Per-call bookkeeping on every server: request id, access log line, RPC metrics.

The interceptor binds the caller's `x-request-id` to the call's context (so every log line the
call produces names it), logs one line per call with its final status and time, and counts the
call in `fluxmesh_rpc_handled_total` / `fluxmesh_rpc_seconds` (and in `fluxmesh_rpc_in_flight`
while it runs). Health checks and reflection are counted but not logged: a monitor polling twice
a second would bury the request lines.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager

import grpc

from fluxmesh.rpc import request_ids
from fluxmesh.rpc.handlers import wrap_handler
from fluxmesh.rpc.metrics import RPC_HANDLED, RPC_IN_FLIGHT, RPC_SECONDS

log = logging.getLogger("fluxmesh.rpc.access")

QUIET_SERVICES = (
    "grpc.health.v1.Health",
    "grpc.reflection.v1alpha.ServerReflection",
    "grpc.reflection.v1.ServerReflection",
)


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None, deadline: float | None) -> str:
    """The status the call ends with. Only asks the context while the handler still runs: once
    grpc has finished a call its context must not be touched (peer() then crashes the process)."""
    if error is None:
        return "OK"
    if isinstance(error, GeneratorExit):  # a stream its client stopped reading
        return "CANCELLED"
    if isinstance(error, asyncio.CancelledError):
        return "DEADLINE_EXCEEDED" if deadline is not None and time.monotonic() >= deadline - 0.005 else "CANCELLED"
    if isinstance(error, grpc.aio.AbortError):
        code = context.code()  # set by context.abort() just before it raised
        return code.name if code is not None else "UNKNOWN"
    return "UNKNOWN"


class ObservabilityInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        full = handler_call_details.method or ""
        service, _, method = full.lstrip("/").partition("/")
        request_id = request_ids.from_metadata(handler_call_details.invocation_metadata)
        quiet = service in QUIET_SERVICES
        with request_ids.bind(request_id):  # also covers what the continuation logs
            handler = await continuation(handler_call_details)

        @asynccontextmanager
        async def observed(request, context):
            started = time.perf_counter()
            remaining = context.time_remaining()
            deadline = None if remaining is None else time.monotonic() + remaining
            peer = context.peer()
            code = "OK"
            in_flight = RPC_IN_FLIGHT.labels(service, method)
            in_flight.inc()
            with request_ids.bind(request_id):
                try:
                    yield
                except BaseException as error:
                    code = _final_code(context, error, deadline)
                    raise
                finally:
                    in_flight.dec()
                    seconds = time.perf_counter() - started
                    RPC_HANDLED.labels(service, method, code).inc()
                    RPC_SECONDS.labels(service, method).observe(seconds)
                    if not quiet:
                        log.info("%s %s in %.3fs (peer %s)", method, code, seconds, peer)

        return wrap_handler(handler, observed)
