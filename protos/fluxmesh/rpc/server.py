"""Start a fluxmesh gRPC server the same way for every process.

Every server gets: fluxmesh's message limits, the error-mapping interceptor, standard
`grpc.health.v1` health (SERVING once its services are registered, NOT_SERVING while it
drains), server reflection (v1 and v1alpha), and a graceful stop on SIGTERM/SIGINT: refuse new
calls, let calls in flight finish within the grace period, then return so the process exits 0.
A server that listens beyond loopback without demanding credentials says so loudly at start.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from fluxmesh.rpc.channels import MESSAGE_OPTIONS
from fluxmesh.rpc.health import HealthServicer
from fluxmesh.rpc.interceptors import Discloses, ErrorMappingInterceptor
from fluxmesh.rpc.metrics import serve_metrics
from fluxmesh.rpc.observability import ObservabilityInterceptor
from fluxmesh.rpc.request_ids import install_log_field
from fluxmesh.rpc.security import ServerSecurity, is_loopback

log = logging.getLogger(__name__)

DEFAULT_GRACE_SECONDS = 30.0


@dataclass(frozen=True)
class Service:
    """One servicer and how to register it: `add` is the generated `add_XServicer_to_server`."""

    name: str  # full name, e.g. "fluxmesh.v1.Denoiser"
    servicer: Any
    add: Callable[[Any, grpc.aio.Server], None]


class ServerStartError(RuntimeError):
    """A server could not start listening (port taken, address not local); the message says which."""


class Server:
    """A grpc.aio server with health, reflection and graceful shutdown."""

    def __init__(
        self,
        services: Sequence[Service],
        *,
        address: str,
        security: ServerSecurity | None = None,
        max_receive_bytes: int | None = None,
        metrics_port: int | None = None,
        discloses: Discloses | None = None,
    ):
        """`discloses`: which callers read server faults in full (None: all; interceptors.py)."""
        self.services = list(services)
        self.address = address
        self.grace_seconds = DEFAULT_GRACE_SECONDS
        self.security = security or ServerSecurity()
        self.metrics_port = metrics_port
        install_log_field()
        self.health = HealthServicer()  # its Watch streams end when the drain starts
        # Clients ping every 30 s (the orchestrator its stages every 10 s) to find dead peers
        # (channels.py, replicas.py); without these the server would count idle pings as abuse
        # and drop the connection (GOAWAY too_many_pings).
        options = [
            *MESSAGE_OPTIONS,
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            # gRPC sets SO_REUSEPORT by default: a second server on a taken port would then
            # start "fine" and silently split the calls with the first. Fail loudly instead.
            ("grpc.so_reuseport", 0),
        ]
        if max_receive_bytes is not None:  # e.g. the public API takes far less than stage tensors
            options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
            options.append(("grpc.max_receive_message_length", max_receive_bytes))
        # Outermost first: every call is counted and logged with its request id (refusals too),
        # then authenticated, then the handler's errors become statuses.
        self._server = grpc.aio.server(
            interceptors=[
                ObservabilityInterceptor(),
                *self.security.interceptors(),
                ErrorMappingInterceptor(discloses),
            ],
            options=options,
        )
        for service in self.services:
            service.add(service.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        _enable_reflection([s.name for s in self.services], self._server)
        server_credentials = self.security.credentials()
        try:
            if server_credentials is not None:
                self.port = self._server.add_secure_port(address, server_credentials)
            else:
                self.port = self._server.add_insecure_port(address)
            failure = "bound nothing" if self.port == 0 else ""  # older grpcio returns 0 instead of raising
        except RuntimeError as error:  # grpc's "Failed to bind to address ..."
            failure = str(error)
        if failure:
            raise ServerStartError(
                f"cannot listen on {address}: the port is in use or the address is not this host's ({failure})"
            )
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool, service: str = "") -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await _maybe_await(self.health.set(service, status))

    async def set_all_serving(self, serving: bool) -> None:
        """The whole server's status and each service's."""
        for name in ["", *[s.name for s in self.services]]:
            await self.set_serving(serving, name)

    async def start(self, *, serving: bool = True) -> None:
        """Start listening; `serving=False` leaves health NOT_SERVING for the caller to flip."""
        # Metrics first: a taken metrics port stops start-up before the server accepts any call.
        try:
            self.metrics_port = serve_metrics(self.metrics_port, _host(self.address))
        except OSError as error:
            raise ServerStartError(f"cannot serve metrics on port {self.metrics_port}: {error.strerror}") from None
        await self._server.start()
        await self.set_all_serving(serving)
        log.info(
            "serving %s on %s (%s)", ", ".join(s.name for s in self.services), self.address, self.security.describe()
        )
        if not is_loopback(self.address) and not self.security.authenticates:
            log.warning(
                "UNPROTECTED: %s listens on %s, beyond loopback, and demands no credential: anyone "
                "who reaches the port may call %s. Listen on 127.0.0.1, or demand a token "
                "(--token-file/--token-env) or client certificates (--require-client-cert).",
                ", ".join(s.name for s in self.services),
                self.address,
                "it" if len(self.services) == 1 else "them",
            )

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, finish calls in flight within `grace`."""
        await _maybe_await(self.health.enter_graceful_shutdown())
        await self._server.stop(self.grace_seconds if grace is None else grace)
        self._stopping.set()

    def request_stop(self) -> None:
        if not self._stopping.is_set():
            asyncio.get_running_loop().create_task(self.stop())

    async def serve_until_signalled(self) -> None:
        """Start, then run until SIGTERM/SIGINT (or `stop()`), draining before returning."""
        await self.start()
        await self.wait_for_signal()

    async def wait_for_signal(self) -> None:
        """Run until SIGTERM/SIGINT (or `stop()`), draining before returning."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        await self._stopping.wait()
        await self._server.wait_for_termination()
        log.info("stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("%s: draining (grace %.0fs)", sig.name, self.grace_seconds)
        self.request_stop()


REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _enable_reflection(service_names: list[str], server: grpc.aio.Server) -> None:
    """Server reflection under both names tools use. grpcio-reflection ships only v1alpha; v1 is
    the same protocol renamed (identical messages, field for field), so the v1alpha servicer
    answers it too, registered here under the v1 name (some tools, e.g. grpcurl >= 1.9 and
    Postman, speak v1 first or only)."""
    names = [
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
        REFLECTION_V1,
    ]
    servicer = reflection.aio.ReflectionServicer(names)
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": handler}),)
    )


def _host(address: str) -> str:
    return address.rpartition(":")[0]


async def _maybe_await(value: Any) -> None:
    if asyncio.iscoroutine(value):
        await value
