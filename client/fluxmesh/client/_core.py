"""What the sync and async clients share besides GenerateOptions: error translation and metadata.

The two clients differ only in how they wait; everything else lives here or in `options` once.
"""

from __future__ import annotations

import grpc

from fluxmesh.rpc.errors import FluxmeshError

Metadata = tuple[tuple[str, str], ...]


def translate(error: grpc.RpcError) -> FluxmeshError:
    """One exception type reaches SDK users: status code + message."""
    # Calls' errors (sync and aio) carry code() and details(); grpc.RpcError itself declares neither.
    code_of, details_of = getattr(error, "code", None), getattr(error, "details", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details = details_of() if callable(details_of) else str(error)
    return FluxmeshError(details or code.name, code=code)


def metadata(token: str | None) -> Metadata | None:
    return (("authorization", f"Bearer {token}"),) if token else None


def no_result() -> FluxmeshError:
    return FluxmeshError("the stream ended without a result", code=grpc.StatusCode.INTERNAL)
