"""How long a stage call may take: the caller's deadline, or the server's cap when it sent none.

Python gRPC does not carry an incoming call's deadline to the calls a handler makes, so every
stage call is given the time left on the Generate call. A client that sets no deadline gets the
orchestrator's `--request-timeout` instead, so no request (and no stage stream) can hang forever
on a stage that stopped answering without closing its connection.
"""

from __future__ import annotations

import contextvars
import time

import grpc

# Absolute (monotonic) deadline of the current request when its client set none.
_fallback: contextvars.ContextVar[float | None] = contextvars.ContextVar("fluxmesh_fallback_deadline", default=None)


def start(context: grpc.aio.ServicerContext, default_seconds: float | None) -> None:
    """Call once when a request starts: arms the server's cap if the client set no deadline."""
    if context.time_remaining() is None and default_seconds:
        _fallback.set(time.monotonic() + default_seconds)
    else:
        _fallback.set(None)


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left for this request (None: unlimited), to pass as `timeout=` to stage calls."""
    remaining = context.time_remaining()
    if remaining is not None:
        return max(0.0, remaining)
    at = _fallback.get()
    return None if at is None else max(0.0, at - time.monotonic())
