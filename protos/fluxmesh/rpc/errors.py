"""Errors that are answers: each maps to one gRPC status, and names what was wrong.

Handlers and model code raise these plain exceptions; one server interceptor
(`fluxmesh.rpc.interceptors.ErrorMappingInterceptor`) turns them into statuses, so no
servicer repeats `context.abort(...)` logic. The SDK turns statuses back into `FluxmeshError`.
"""

from __future__ import annotations

import grpc

__all__ = [
    "FluxmeshError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "StageUnavailable",
    "FailedPrecondition",
    "Unauthenticated",
    "Cancelled",
    "PermissionDenied",
    "UsageError",
    "check_range",
]


class UsageError(ValueError):
    """A start-up setting that cannot work (a flag out of range, a missing file): the operator's
    to fix, answered by the CLI in one line with exit code 2, before anything starts."""


def check_range(flag: str, value: float | None, *, minimum: float, allow_none: bool = False,
                inclusive: bool = True, why: str = "") -> None:
    """Refuse `value` of `flag` below `minimum` (or equal to it when not `inclusive`)."""
    if value is None and allow_none:
        return
    if value is None or value < minimum or (not inclusive and value == minimum):
        bound = f"at least {minimum:g}" if inclusive else f"above {minimum:g}"
        shown = "none" if value is None else f"{value:g}"
        raise UsageError(f"{flag} {shown}: must be {bound}" + (f" ({why})" if why else ""))


class FluxmeshError(Exception):
    """Base of every fluxmesh error; `code` is the gRPC status it travels as."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"


class InvalidArgument(FluxmeshError, ValueError):
    """A request field is wrong; the message starts with the field's name and shows the value."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


class PermissionDenied(FluxmeshError):
    """An authenticated caller asked for more than it may; the message starts with the field."""

    code = grpc.StatusCode.PERMISSION_DENIED

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field


class NotFound(FluxmeshError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(FluxmeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(FluxmeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(FluxmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(FluxmeshError):
    code = grpc.StatusCode.CANCELLED


class StageUnavailable(FluxmeshError):
    """A stage service cannot be reached; the message names the stage and its address."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, stage: str, detail: str):
        super().__init__(f"{stage} stage unavailable: {detail}")
        self.stage = stage
