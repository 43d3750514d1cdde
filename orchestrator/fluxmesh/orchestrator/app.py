"""`fluxmesh serve orchestrator`: the public Generator service in front of the three stages."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.orchestrator.generator import GeneratorServicer, Stages
from fluxmesh.orchestrator.monitor import StageMonitor
from fluxmesh.orchestrator.stages import DenoiserClient, EncoderClient, VaeClient
from fluxmesh.rpc.server import Server, Service
from fluxmesh.v1 import generator_pb2_grpc


@dataclass(frozen=True)
class OrchestratorOptions:
    encoder: str
    denoiser: str
    vae: str
    address: str = "[::]:50050"
    max_active: int = 2
    max_queue: int = 32


def build_server(options: OrchestratorOptions) -> tuple[Server, StageMonitor]:
    stages = Stages(EncoderClient(options.encoder), DenoiserClient(options.denoiser), VaeClient(options.vae))
    servicer = GeneratorServicer(stages, AdmissionQueue(max_active=options.max_active, max_waiting=options.max_queue))
    service = Service("fluxmesh.v1.Generator", servicer, generator_pb2_grpc.add_GeneratorServicer_to_server)
    server = Server([service], address=options.address)

    async def mirror(all_up: bool) -> None:
        # Overall and Generator health follow the stages; the process itself is alive either way.
        for name in ("", service.name):
            await server.set_serving(all_up, name)

    return server, StageMonitor(stages.all(), mirror)


def serve_orchestrator(options: OrchestratorOptions) -> None:
    async def main() -> None:
        server, monitor = build_server(options)
        await server.start(serving=False)
        await monitor.start()
        try:
            await server.wait_for_signal()
        finally:
            await monitor.stop()

    asyncio.run(main())
