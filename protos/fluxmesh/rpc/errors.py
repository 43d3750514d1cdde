"""Errors that are answers: each maps to one gRPC status, and names what was wrong.

Handlers and model code raise these plain exceptions; one server interceptor
(`fluxmesh.rpc.interceptors.ErrorMappingInterceptor`) turns them into statuses, so no
servicer repeats `context.abort(...)` logic. The SDK turns statuses back into `FluxmeshError`.

An error a program must tell apart from others of its code carries a `reason`: it travels as a
`google.rpc.ErrorInfo` status detail (grpcio-status's rich errors), so the caller reads a
constant, never the wording of the message.
"""

from __future__ import annotations

import grpc

__all__ = [
    "FluxmeshError",
    "InvalidArgument",
    "NotFound",
    "ResourceExhausted",
    "StageFailed",
    "StageUnavailable",
    "FailedPrecondition",
    "Unauthenticated",
    "Cancelled",
    "PermissionDenied",
    "UsageError",
    "check_range",
    "NotResident",
    "ERROR_DOMAIN",
    "NOT_RESIDENT",
    "rich_status",
    "reason_of",
    "is_server_fault",
    "public_error",
]

ERROR_DOMAIN = "fluxmesh.v1"  # google.rpc.ErrorInfo.domain of every fluxmesh reason
NOT_RESIDENT = "NOT_RESIDENT"  # a stage's weights are not on its device (fluxmesh.v1.Residency)


class UsageError(ValueError):
    """A start-up setting that cannot work (a flag out of range, a missing file): the operator's
    to fix, answered by the CLI in one line with exit code 2, before anything starts."""


def check_range(
    flag: str, value: float | None, *, minimum: float, allow_none: bool = False, inclusive: bool = True, why: str = ""
) -> None:
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
    reason: str = ""  # ErrorInfo.reason when the caller must tell this error apart ("" if not)

    def __init__(self, message: str, *, code: grpc.StatusCode | None = None, reason: str | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if reason is not None:
            self.reason = reason

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


class NotResident(FailedPrecondition):
    """A model call on a stage whose weights are not on its device (sequential mode: the
    orchestrator has not loaded it, or the stage restarted and forgot)."""

    reason = NOT_RESIDENT


class Unauthenticated(FluxmeshError):
    code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(FluxmeshError):
    code = grpc.StatusCode.CANCELLED


class StageFailed(FluxmeshError):
    """A stage's failure as the orchestrator relays it; `stage` names the stage."""

    def __init__(self, stage: str, message: str, *, code: grpc.StatusCode | None = None, reason: str | None = None):
        super().__init__(message, code=code, reason=reason)
        self.stage = stage


class StageUnavailable(StageFailed):
    """A stage service cannot be reached; the message names the stage and its address."""

    code = grpc.StatusCode.UNAVAILABLE

    def __init__(self, stage: str, detail: str):
        super().__init__(stage, f"{stage} stage unavailable: {detail}")


# Codes of the server's own failures (a bug, a stage down), never of the caller's input.
SERVER_FAULTS = frozenset(
    {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS}
)


def is_server_fault(error: FluxmeshError) -> bool:
    """The server's failure, not the caller's (also a stage whose weights are not loaded): its
    details (exception text, stage addresses, server paths) are for the operator's log."""
    return error.code in SERVER_FAULTS or error.reason == NOT_RESIDENT


def public_error(error: FluxmeshError, request_id: str) -> FluxmeshError:
    """What a caller who may not see the server's insides hears of a server fault: the code, the
    stage if one failed, and the request id that finds the full message in the server's log."""
    stage = getattr(error, "stage", "")
    what = f"{stage} stage" if stage else "the server"
    what += " is unavailable" if error.code == grpc.StatusCode.UNAVAILABLE else " failed"
    return FluxmeshError(
        f"{what}; quote request id {request_id} to its operator (the server's log has the details)",
        code=error.code,
        reason=error.reason,
    )


def rich_status(error: FluxmeshError) -> grpc.Status:
    """`error` as a status with its reason in a google.rpc.ErrorInfo detail."""
    from google.protobuf import any_pb2
    from google.rpc import error_details_pb2, status_pb2
    from grpc_status import rpc_status

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN))
    return rpc_status.to_status(status_pb2.Status(code=error.code.value[0], message=error.message, details=[detail]))


def reason_of(error: grpc.RpcError) -> str:
    """The fluxmesh ErrorInfo reason a failed call's status carries ("" when none)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    try:
        status = rpc_status.from_call(error)
    except ValueError:  # details that contradict the call's code or message: not ours
        return ""
    for detail in status.details if status is not None else ():
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info) and info.domain == ERROR_DOMAIN:
            return info.reason
    return ""
