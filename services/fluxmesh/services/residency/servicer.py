"""The fluxmesh.v1.Residency service every stage process serves next to its own service."""

from __future__ import annotations

import grpc

from fluxmesh.contract import ReleaseTo
from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.rpc.server import Service
from fluxmesh.services.residency.state import Residency
from fluxmesh.services.runtime.worker import ModelWorker
from fluxmesh.v1 import residency_pb2, residency_pb2_grpc


class ResidencyServicer(residency_pb2_grpc.ResidencyServicer):
    def __init__(self, residency: Residency, worker: ModelWorker, *, control: bool):
        self.residency = residency
        # The stage's own model thread: a transition waits for the model call in progress, and
        # model calls queued behind it see the new state.
        self.worker = worker
        # Load/Release are the orchestrator's alone. Without a stage credential anyone who
        # reaches the port could unload a resident stage, so they answer only where the stage
        # demands one, or where it was started for sequential mode (not resident at start).
        self.control = control

    async def Load(self, request: residency_pb2.LoadRequest, context) -> residency_pb2.ResidencyStatus:
        self._check_control("Load")
        seconds = await self.worker.run_unchecked(self.residency.load)
        return self.status(seconds)

    async def Release(self, request: residency_pb2.ReleaseRequest, context) -> residency_pb2.ResidencyStatus:
        self._check_control("Release")
        seconds = await self.worker.run_unchecked(self.residency.release, ReleaseTo.from_request(request))
        return self.status(seconds)

    def _check_control(self, method: str) -> None:
        if not self.control:
            raise FluxmeshError(
                f"Residency/{method}: residency control is off on this {self.residency.stage} stage: it was started "
                "resident and demands no stage credential (give it --token-file/--token-env or "
                "--require-client-cert, or start it for sequential mode with --residency)",
                code=grpc.StatusCode.PERMISSION_DENIED,
            )

    async def Status(self, request, context) -> residency_pb2.ResidencyStatus:
        status = self.status(0.0)
        status.transitions.extend(
            residency_pb2.ResidencyTransition(
                from_state=t.from_state, to_state=t.to_state, started_unix=t.started_unix, finished_unix=t.finished_unix
            )
            for t in self.residency.transitions
        )
        return status

    def status(self, seconds: float) -> residency_pb2.ResidencyStatus:
        return residency_pb2.ResidencyStatus(seconds=seconds, **self.residency.snapshot())


def residency_service(residency: Residency, worker: ModelWorker, *, control: bool) -> Service:
    """Guard the stage's model calls with `residency` and serve its RPCs on the same thread;
    `control`: whether Load and Release answer (see ResidencyServicer)."""
    worker.precondition = residency.require_resident
    return Service(
        "fluxmesh.v1.Residency",
        ResidencyServicer(residency, worker, control=control),
        residency_pb2_grpc.add_ResidencyServicer_to_server,
    )
