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
]


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
