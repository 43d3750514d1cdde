"""What the sync and async clients share besides GenerateOptions: error translation and metadata.

The two clients differ only in how they wait; everything else lives here or in `options` once.
"""

from __future__ import annotations

import re

import grpc

from fluxmesh.rpc.errors import FluxmeshError, InvalidArgument
from fluxmesh.rpc.security import check_token_transport

Metadata = tuple[tuple[str, str], ...]

# What an HTTP/2 header value may hold (visible ASCII and inner spaces); grpc itself would fail the
# first call with an INTERNAL "Invalid metadata" that names nothing.
_TOKEN = re.compile(r"[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?")


def check_timeout(timeout: object, field: str = "timeout") -> None:
    """A deadline in seconds, or None for none."""
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))):
        raise InvalidArgument(field, f"{timeout!r}; expected seconds as a number, or None")


def connection(
    address: object,
    token: object,
    credentials: object,
    timeout: object,
    allow_plaintext_token: bool,
) -> Metadata | None:
    """Check what a client is constructed with (both clients' one rule); returns its call metadata."""
    if not isinstance(address, str) or not address:
        raise InvalidArgument("address", f"{address!r}; expected 'host:port'")
    if token is not None and not (isinstance(token, str) and _TOKEN.fullmatch(token)):
        raise InvalidArgument("token", "must be a string of printable ASCII characters (a header value)")
    if credentials is not None and not isinstance(credentials, grpc.ChannelCredentials):
        raise InvalidArgument("credentials", f"a {type(credentials).__name__}; expected grpc.ChannelCredentials")
    check_timeout(timeout)
    # A token goes over plaintext only to loopback, or when the caller says so.
    check_token_transport(address, token, tls=credentials is not None, allow_plaintext=allow_plaintext_token)
    return metadata(token)


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
