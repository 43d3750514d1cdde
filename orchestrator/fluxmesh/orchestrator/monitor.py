"""Watch the stages' grpc.health.v1 status and mirror it in the orchestrator's own health.

The orchestrator is SERVING only while every stage it depends on is SERVING: load balancers,
`fluxmesh up` and container health checks then see one honest answer, and the orchestrator
recovers by itself when a stage comes back (no restart), whatever order things start in.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxmesh.orchestrator.stages import StageClient

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING


class StageMonitor:
    def __init__(
        self,
        stages: Sequence[StageClient],
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval: float = 0.5,
    ):
        self.stages = list(stages)
        self.on_change = on_change
        self.interval = interval
        self.up: dict[str, bool] = {stage.stage: False for stage in self.stages}
        self._task: asyncio.Task | None = None

    @property
    def all_up(self) -> bool:
        return all(self.up.values())

    async def _check(self, stage: StageClient) -> bool:
        """A stage is up while any of its replicas is; each replica's health also tells the
        stage client which replicas to skip."""
        results = await asyncio.gather(*(self._check_replica(r.channel) for r in stage.replicas.replicas))
        for replica, ok in zip(stage.replicas.replicas, results):
            if ok != (replica.down_until == 0.0) and len(stage.replicas) > 1:
                log.info("%s replica %s is %s", stage.stage, replica.target, "SERVING" if ok else "down")
            stage.replicas.set_health(replica, ok)
        return any(results)

    async def _check_replica(self, channel: grpc.aio.Channel) -> bool:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=max(self.interval, 1.0))
        except grpc.aio.AioRpcError:
            return False
        return reply.status == SERVING

    async def check_once(self) -> None:
        results = await asyncio.gather(*(self._check(stage) for stage in self.stages))
        changed = False
        for stage, ok in zip(self.stages, results):
            if self.up[stage.stage] != ok:
                log.info("%s stage at %s is %s", stage.stage, stage.address, "SERVING" if ok else "down")
                self.up[stage.stage] = ok
                changed = True
        if changed:
            await self.on_change(self.all_up)

    async def _run(self) -> None:
        while True:
            await self.check_once()
            await asyncio.sleep(self.interval)

    async def start(self) -> None:
        await self.check_once()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
