"""Serve the gateway with uvicorn: loopback by default, TLS with the same flags as the gRPC ports."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import Any

import uvicorn

from fluxmesh.gateway.app import GatewayOptions, create_app
from fluxmesh.rpc.security import ServerSecurity

log = logging.getLogger(__name__)


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def uvicorn_config(
    options: GatewayOptions, *, host: str = "127.0.0.1", port: int = 8000, security: ServerSecurity | None = None
) -> uvicorn.Config:
    security = security or ServerSecurity()
    tls: dict[str, Any] = {}
    if security.tls:
        tls = {
            "ssl_certfile": str(security.cert),
            "ssl_keyfile": str(security.key),
            "ssl_cert_reqs": ssl.CERT_REQUIRED if security.require_client_cert else ssl.CERT_NONE,
        }
        if security.ca is not None:
            tls["ssl_ca_certs"] = str(security.ca)
    # log_config=None: keep the process's logging (fluxmesh's format) instead of uvicorn's own.
    return uvicorn.Config(
        create_app(options),
        host=host.strip("[]"),
        port=port,
        log_config=None,
        server_header=False,
        timeout_graceful_shutdown=10,
        **tls,
    )


def serve(
    options: GatewayOptions, *, host: str = "127.0.0.1", port: int = 8000, security: ServerSecurity | None = None
) -> None:
    """Run until SIGINT/SIGTERM (uvicorn finishes the requests in flight, then returns)."""
    security = security or ServerSecurity()
    if not _loopback(host) and not security.tls:
        log.warning(
            "serving HTTP on %s without TLS: bearer tokens and images cross the network in the clear "
            "(--tls-cert/--tls-key)",
            host,
        )
    scheme = "https" if security.tls else "http"
    log.info(
        "OpenAI images API and page on %s://%s:%d/ -> orchestrator %s (%s)",
        scheme,
        host,
        port,
        options.orchestrator,
        security.describe(),
    )
    uvicorn.Server(uvicorn_config(options, host=host, port=port, security=security)).run()
