"""TLS, mutual TLS and bearer tokens for every fluxmesh hop.

* `ServerSecurity`: what a server demands — TLS (cert + key), optionally client certificates
  signed by a CA (`require_client_cert`: mutual TLS, so only the orchestrator can drive a
  stage), and optionally a bearer token (`authorization: Bearer <token>` metadata).
* `ClientSecurity`: what a client presents — the CA it trusts, its own certificate for mutual
  TLS, and the token it sends.

Tokens are compared with `hmac.compare_digest` (constant time: a wrong guess does not leak how
many leading characters were right). Health checks are exempt from the token so load balancers
and `fluxmesh health` can probe without a secret; TLS (and client certificates, when required)
still apply to them because the handshake comes before any RPC.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from fluxmesh.rpc.errors import InvalidArgument, UsageError

log = logging.getLogger(__name__)

__all__ = [
    "ClientSecurity",
    "ServerSecurity",
    "TokenAuthInterceptor",
    "read_token",
    "read_tokens",
    "read_priority_grants",
    "presented_token",
    "is_loopback",
    "check_token_transport",
    "STAGE_TOKEN_ENV",
    "SecurityConfigError",
]

AUTHORIZATION = "authorization"
# Services anyone may call without a token: probes must work without the secret.
TOKEN_EXEMPT_SERVICES = ("grpc.health.v1.Health",)
# Where `fluxmesh up` hands its children the stage token it made (never argv: /proc shows argv
# to every local user, a process's environment only to its own user).
STAGE_TOKEN_ENV = "FLUXMESH_STAGE_TOKEN"


class SecurityConfigError(UsageError):
    """A TLS or token setting that cannot work (missing file, key without cert, empty token...)."""


def _read(path: Path | str, what: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as error:
        raise SecurityConfigError(f"{what} {path}: {error.strerror or error}") from None


MAX_PRIORITY_GRANT = "max-priority"  # `TOKEN max-priority=N` in a token file


def _token_lines(file: Path | str) -> list[list[str]]:
    """A token file's lines as fields: `TOKEN [max-priority=N]`; blank lines and # comments skipped."""
    lines = _read(file, "token file").decode("utf-8").splitlines()
    found = [line.split() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not found:
        raise SecurityConfigError(f"token file {file} holds no token")
    for fields in found:
        for extra in fields[1:]:
            name, _, value = extra.partition("=")
            if name != MAX_PRIORITY_GRANT or not value.lstrip("-").isdigit():
                raise SecurityConfigError(f"token file {file}: {extra!r} is not {MAX_PRIORITY_GRANT}=<integer>")
    return found


def read_tokens(*, file: Path | str | None = None, env: str | None = None) -> tuple[str, ...]:
    """Accepted tokens from a file (one per line: several allow rotation) and/or an env variable."""
    tokens: list[str] = []
    if file is not None:
        tokens += [fields[0] for fields in _token_lines(file)]
    if env is not None:
        value = os.environ.get(env, "").strip()
        if not value:
            raise SecurityConfigError(f"environment variable {env} is unset or empty")
        tokens.append(value)
    for token in tokens:
        if any(c.isspace() for c in token) or not token.isprintable():
            raise SecurityConfigError("a token must be printable and contain no whitespace")
    return tuple(tokens)


def read_priority_grants(file: Path | str) -> dict[str, int]:
    """{token: the highest request priority it may use} from a token file's `max-priority=N` fields."""
    return {fields[0]: int(extra.partition("=")[2]) for fields in _token_lines(file) for extra in fields[1:]}


def read_token(*, file: Path | str | None = None, env: str | None = None) -> str | None:
    """The one token a client sends (the first line of the file, or the variable), or None."""
    if file is None and env is None:
        return None
    return read_tokens(file=file, env=env)[0]


@dataclass(frozen=True)
class ServerSecurity:
    """TLS / mutual TLS / token settings of one server. The default is plaintext, no token."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None  # client certificates must be signed by it (with require_client_cert)
    require_client_cert: bool = False
    tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("--tls-cert and --tls-key go together")
        if self.require_client_cert and (self.ca is None or self.cert is None):
            raise SecurityConfigError("--require-client-cert needs --tls-cert, --tls-key and --tls-ca")
        if self.ca is not None and self.cert is None:
            raise SecurityConfigError("--tls-ca on a server needs --tls-cert and --tls-key")

    @property
    def tls(self) -> bool:
        return self.cert is not None

    @property
    def authenticates(self) -> bool:
        """Whether a caller must present a credential (a token or a client certificate); TLS
        alone only hides the bytes, it lets anyone in."""
        return bool(self.tokens) or self.require_client_cert

    def credentials(self) -> grpc.ServerCredentials | None:
        """Server credentials, or None for plaintext."""
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(_read(self.key, "TLS key"), _read(self.cert, "TLS certificate"))],
            root_certificates=_read(self.ca, "TLS CA") if self.ca is not None else None,
            require_client_auth=self.require_client_cert,
        )

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [TokenAuthInterceptor(self.tokens)] if self.tokens else []

    def describe(self) -> str:
        parts = ["mutual TLS" if self.require_client_cert else "TLS" if self.tls else "plaintext"]
        if self.tokens:
            parts.append("bearer token")
        return " + ".join(parts)


@dataclass(frozen=True)
class ClientSecurity:
    """What a client presents: the CA it trusts, its certificate (mutual TLS), its token."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    tls: bool = False  # TLS with the system's roots when no CA is given
    server_name: str | None = None  # expected name in the server certificate, if not the address's host
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise SecurityConfigError("a client certificate needs both --tls-cert and --tls-key")

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.ca is not None or self.cert is not None

    def credentials(self) -> grpc.ChannelCredentials | None:
        if not self.uses_tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "TLS CA") if self.ca is not None else None,
            private_key=_read(self.key, "TLS key") if self.key is not None else None,
            certificate_chain=_read(self.cert, "TLS certificate") if self.cert is not None else None,
        )

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION, f"Bearer {self.token}"),) if self.token else ()


def is_loopback(address: str) -> bool:
    """Whether `address` (host:port, [v6]:port, a gRPC target such as dns:///host:port or
    unix:path) reaches only this machine. A name other than localhost is not loopback: it may
    resolve anywhere."""
    if address.startswith(("unix:", "unix-abstract:")):
        return True
    target = address.split("///", 1)[1] if "///" in address else address.removeprefix("ipv4:").removeprefix("ipv6:")
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    host = host.strip("[]").lower()
    if host in ("localhost", "localhost.", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_token_transport(address: str, token: str | None, *, tls: bool, allow_plaintext: bool) -> None:
    """Refuse to send a bearer token in the clear beyond this machine unless the caller said so:
    anyone on the path could read it and use it."""
    if token and not tls and not allow_plaintext and not is_loopback(address):
        raise InvalidArgument(
            "token",
            f"refusing to send a bearer token over plaintext to {address}: connect "
            "with TLS, or allow it explicitly (allow_plaintext_token=True, "
            "--allow-plaintext-token) on a network you trust",
        )


def presented_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The bearer token in a call's metadata, if any (the caller's identity, once authenticated)."""
    for key, value in metadata or ():
        if key == AUTHORIZATION:
            value = value.decode("latin-1") if isinstance(value, bytes) else value
            scheme, _, credential = value.partition(" ")
            return credential.strip() if scheme.lower() == "bearer" else None
    return None


def token_matches(presented: str | None, accepted: Sequence[str]) -> bool:
    """Constant-time comparison against every accepted token (no early exit on a match)."""
    if presented is None:
        return False
    given = presented.encode("utf-8", "surrogateescape")
    matched = False
    for token in accepted:
        matched |= hmac.compare_digest(given, token.encode("utf-8"))
    return matched


class TokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """UNAUTHENTICATED for any call (health checks aside) without one of the accepted tokens."""

    def __init__(self, tokens: Sequence[str]):
        if not tokens:
            raise SecurityConfigError("TokenAuthInterceptor needs at least one token")
        self._tokens = tuple(tokens)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method or ""
        if method.lstrip("/").split("/")[0] in TOKEN_EXEMPT_SERVICES:
            return await continuation(handler_call_details)
        presented = presented_token(handler_call_details.invocation_metadata)
        if token_matches(presented, self._tokens):
            return await continuation(handler_call_details)
        reason = "missing bearer token" if presented is None else "invalid bearer token"
        log.warning("%s refused: %s", method, reason)
        handler = await continuation(handler_call_details)
        return _refusal(handler, reason)


def _refusal(handler: grpc.RpcMethodHandler | None, reason: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers UNAUTHENTICATED without running anything."""
    # An unauthenticated caller's bytes are never parsed.
    deserializer = _ignore
    serializer = handler.response_serializer if handler is not None else None
    message = f"{reason}; send 'authorization: Bearer <token>' metadata"

    if handler is not None and handler.unary_stream is not None:

        async def refuse_stream(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this an async generator

        return grpc.unary_stream_rpc_method_handler(refuse_stream, deserializer, serializer)
    if handler is not None and handler.stream_stream is not None:

        async def refuse_bidi(requests, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover

        return grpc.stream_stream_rpc_method_handler(refuse_bidi, deserializer, serializer)
    if handler is not None and handler.stream_unary is not None:

        async def refuse_client_stream(requests, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.stream_unary_rpc_method_handler(refuse_client_stream, deserializer, serializer)

    async def refuse(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    return grpc.unary_unary_rpc_method_handler(refuse, deserializer, serializer)


def _ignore(data: bytes) -> None:
    return None
