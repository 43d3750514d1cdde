"""How long a stage call may take: one `Deadline` per request (and per stage call across its
retries): the caller's deadline or the server's cap, whichever is sooner.

Python gRPC does not carry an incoming call's deadline to the calls a handler makes, so every
stage call is given the time left on the Generate call. The orchestrator's `--request-timeout`
caps every request: one without a deadline gets the cap, and a client's longer deadline does
not lift it (the smaller of the two wins), so no request (and no stage stream) can hold the
stages longer than the operator allows.
"""

from __future__ import annotations

import time

import grpc


class Deadline:
    """The time left of a budget (None: no deadline)."""

    def __init__(self, timeout: float | None):
        self._end = None if timeout is None else time.monotonic() + timeout

    @classmethod
    def of_call(cls, context: grpc.aio.ServicerContext, cap_seconds: float | None = None) -> Deadline:
        """The incoming call's deadline, capped at `cap_seconds` from now (None or 0: no cap)."""
        left = [t for t in (context.time_remaining(), cap_seconds or None) if t is not None]
        return cls(max(0.0, min(left)) if left else None)

    def left(self, default: float | None = None) -> float | None:
        """Seconds left, to pass as `timeout=` (0.0 once expired); `default` only when there is
        no deadline at all — an expired one stays expired."""
        if self._end is None:
            return default
        return max(0.0, self._end - time.monotonic())

    def expired(self) -> bool:
        return self._end is not None and time.monotonic() >= self._end
