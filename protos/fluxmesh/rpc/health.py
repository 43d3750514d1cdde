"""grpc.health.v1 for asyncio servers, with Watch streams that end when the server drains.

grpc's own asyncio HealthServicer keeps every Watch stream open until the client leaves. A
draining server waits for its calls in flight, and a load balancer's Watch is one of them, so
every SIGTERM would sit out the whole grace period. Here a Watch stream sends NOT_SERVING when
the drain starts and then ends, so only real work holds the drain.
"""

from __future__ import annotations

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):
    def __init__(self) -> None:
        self._status: dict[str, int] = {}
        self._changed = asyncio.Condition()
        self._draining = False

    async def set(self, service: str, status: int) -> None:
        """Set a service's status ("" is the whole server); ignored once draining."""
        async with self._changed:
            if self._draining:
                return
            self._status[service] = status
            self._changed.notify_all()

    async def enter_graceful_shutdown(self) -> None:
        """NOT_SERVING for everything from now on; Watch streams report it and end."""
        async with self._changed:
            self._draining = True
            for service in self._status:
                self._status[service] = NOT_SERVING
            self._changed.notify_all()

    async def Check(self, request: health_pb2.HealthCheckRequest, context) -> health_pb2.HealthCheckResponse:
        status = self._status.get(request.service)
        if status is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, context) -> health_pb2.HealthListResponse:
        async with self._changed:
            statuses = dict(self._status)
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=status) for name, status in statuses.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context):
        last = None
        while True:
            async with self._changed:
                status = self._status.get(request.service, SERVICE_UNKNOWN)
                draining = self._draining
                if status == last and not draining:
                    await self._changed.wait()
                    continue
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            if draining:
                return
