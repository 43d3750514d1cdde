"""How long a stage call may take: the caller's deadline or the server's cap, whichever is sooner.

Python gRPC does not carry an incoming call's deadline to the calls a handler makes, so every
stage call is given the time left on the Generate call. The orchestrator's `--request-timeout`
caps every request: one without a deadline gets the cap, and a client's longer deadline does
not lift it (the smaller of the two wins), so no request (and no stage stream) can hold the
stages longer than the operator allows.
"""

from __future__ import annotations

import contextvars
import time

import grpc

# Absolute (monotonic) end of the current request under the server's cap (None: no cap).
_cap: contextvars.ContextVar[float | None] = contextvars.ContextVar("fluxmesh_request_cap", default=None)


def start(context: grpc.aio.ServicerContext, cap_seconds: float | None) -> None:
    """Call once when a request starts: arms the server's cap (None or 0: no cap)."""
    _cap.set(time.monotonic() + cap_seconds if cap_seconds else None)


def time_left(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left for this request (None: unlimited), to pass as `timeout=` to stage calls."""
    remaining = context.time_remaining()
    at = _cap.get()
    capped = None if at is None else at - time.monotonic()
    left = [t for t in (remaining, capped) if t is not None]
    return max(0.0, min(left)) if left else None
