"""Watch the stages and mirror what they can do in the orchestrator's own health.

The orchestrator is SERVING only while every stage it depends on can serve it: load balancers,
`fluxmesh up` and container health checks then see one honest answer, and the orchestrator
recovers by itself when a stage comes back (no restart), whatever order things start in.

A replica can serve when its grpc.health.v1 says SERVING *and* it answers Residency/Status with
the orchestrator's stage credential: health needs no credential, so it alone would call a stage
fine that refuses every real call (a stage token the orchestrator lacks). In resident mode the
weights must also be resident: a stage whose weights were released serves no request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxmesh.orchestrator.metrics import record_stage_health
from fluxmesh.orchestrator.stages import CREDENTIAL_REFUSALS, StageClient
from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING


class StageMonitor:
    def __init__(
        self,
        stages: Sequence[StageClient],
        on_change: Callable[[bool], Awaitable[None]],
        *,
        interval: float = 0.5,
        expect_resident: bool = True,  # False in sequential mode, where weights come and go
    ):
        self.stages = list(stages)
        self.on_change = on_change
        self.interval = interval
        self.expect_resident = expect_resident
        self.up: dict[str, bool] = {stage.stage: False for stage in self.stages}
        self.why: dict[str, str] = {}  # replica target -> why it cannot serve (logged on change)
        self.served: set[str] = set()  # stages seen serving once: serving again is a restart
        for name in self.up:
            record_stage_health(name, False, came_back=False)
        self._task: asyncio.Task | None = None

    @property
    def all_up(self) -> bool:
        return all(self.up.values())

    async def _check(self, stage: StageClient) -> bool:
        """A stage is up while any of its replicas is; each replica's health also tells the
        stage client which replicas to skip."""
        results = await asyncio.gather(*(self._check_replica(stage.stage, r.channel) for r in stage.replicas.replicas))
        for replica, why in zip(stage.replicas.replicas, results):
            if why != self.why.get(replica.target, "") and why not in ("", "not SERVING"):
                log.warning("%s stage at %s cannot serve: %s", stage.stage, replica.target, why)
            elif len(stage.replicas) > 1 and (why == "") != (replica.down_until == 0.0):
                log.info("%s replica %s is %s", stage.stage, replica.target, "SERVING" if not why else "down")
            self.why[replica.target] = why
            stage.replicas.set_health(replica, not why)
        return any(not why for why in results)

    async def _check_replica(self, stage: str, channel: grpc.aio.Channel) -> str:
        """Why the replica behind `channel` cannot serve ("" when it can). Both probes go at once
        so a busy host's latency does not add up; a Status that merely times out leaves the
        verdict to health, as before it was asked (no flapping under load)."""
        timeout = max(self.interval, 1.0)
        health, residency = await asyncio.gather(
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout),
            residency_pb2_grpc.ResidencyStub(channel).Status(residency_pb2.ResidencyStatusRequest(), timeout=timeout),
            return_exceptions=True,
        )
        if isinstance(health, Exception) or health.status != SERVING:
            return "not SERVING"
        if isinstance(residency, grpc.aio.AioRpcError) and residency.code() in CREDENTIAL_REFUSALS:
            return (
                f"it refuses the orchestrator's stage credential ({residency.code().name}: "
                f"{residency.details()}); check --stage-token-*/--stage-tls-*"
            )
        if isinstance(residency, Exception):
            return ""
        if self.expect_resident and residency.state != "resident":
            return f"its weights are {residency.state}, not resident"
        return ""

    async def check_once(self) -> None:
        results = await asyncio.gather(*(self._check(stage) for stage in self.stages))
        changed = False
        for stage, ok in zip(self.stages, results):
            if self.up[stage.stage] != ok:
                log.info("%s stage at %s is %s", stage.stage, stage.address, "SERVING" if ok else "down")
                self.up[stage.stage] = ok
                record_stage_health(stage.stage, ok, came_back=ok and stage.stage in self.served)
                if ok:
                    self.served.add(stage.stage)
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
