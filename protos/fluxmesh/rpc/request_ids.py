"""A request id that travels with a generation across every service and into every log line.

The orchestrator names each Generate request (or adopts a well-formed `x-request-id` the client
sent); outgoing stage calls carry it as `x-request-id` metadata (`outgoing_metadata`); each
server binds the incoming id to a context variable for the call (`fluxmesh.rpc.observability`),
and `install_log_field` makes `%(request_id)s` available to every log format, so the one id
finds a request's lines in all four processes' logs. Model threads see it too: `ModelWorker`
runs its calls in a copy of the caller's context.
"""

from __future__ import annotations

import contextvars
import logging
import re
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import grpc

__all__ = [
    "METADATA_KEY",
    "outgoing_metadata",
    "adopt",
    "bind",
    "current",
    "from_metadata",
    "install_log_field",
    "new_request_id",
]

METADATA_KEY = "x-request-id"
# Ids come from clients: only short, plain ids are adopted (a log line must not be forgeable).
_WELL_FORMED = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_current: contextvars.ContextVar[str | None] = contextvars.ContextVar("fluxmesh_request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def current() -> str | None:
    return _current.get()


def adopt(request_id: str | None) -> None:
    """Make `request_id` current for the rest of this task (a handler naming its own request);
    the server's per-call binding restores the previous value when the call ends."""
    _current.set(request_id)


@contextmanager
def bind(request_id: str | None) -> Iterator[None]:
    """Make `request_id` the current one for the code inside (and tasks/threads it starts)."""
    previous = _current.get()
    _current.set(request_id)
    try:
        yield
    finally:
        # Not ContextVar.reset(token): an abandoned streaming handler is closed by asyncio in
        # another context, where the token would not be accepted.
        _current.set(previous)


def from_metadata(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The caller's `x-request-id`, when present and well-formed."""
    for key, value in metadata or ():
        if key == METADATA_KEY:
            value = value.decode("ascii", "replace") if isinstance(value, bytes) else value
            return value if _WELL_FORMED.fullmatch(value) else None
    return None


def install_log_field() -> None:
    """Give every log record a `request_id` attribute ("-" outside a request). Idempotent."""
    factory = logging.getLogRecordFactory()
    if getattr(factory, "_fluxmesh_request_id", False):
        return

    def record_factory(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = _current.get() or "-"
        return record

    record_factory._fluxmesh_request_id = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(record_factory)


def outgoing_metadata(fixed: Sequence[tuple[str, str]] = ()) -> list[grpc.aio.ClientInterceptor]:
    """Client interceptors adding fixed metadata (e.g. a bearer token) and the current request id
    to every unary and server-streaming call (grpc.aio files an interceptor under one call kind
    only, hence one object per kind)."""
    return [_UnaryUnaryMetadata(fixed), _UnaryStreamMetadata(fixed)]


class _OutgoingMetadata:
    def __init__(self, fixed: Sequence[tuple[str, str]] = ()):
        self.fixed = tuple(fixed)

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata(*(details.metadata or ()))
        for key, value in self.fixed:
            metadata[key] = value
        request_id = _current.get()
        if request_id is not None:
            metadata[METADATA_KEY] = request_id
        return grpc.aio.ClientCallDetails(
            details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
        )


class _UnaryUnaryMetadata(_OutgoingMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


class _UnaryStreamMetadata(_OutgoingMetadata, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)
