"""`fluxmesh serve orchestrator`: the public Generator service in front of the three stages."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from fluxmesh.contract import LIMITS, Limits
from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.orchestrator.disclosure import Disclosure
from fluxmesh.orchestrator.generator import GeneratorServicer
from fluxmesh.orchestrator.metrics import watch_queue
from fluxmesh.orchestrator.monitor import StageMonitor
from fluxmesh.orchestrator.priorities import PriorityPolicy
from fluxmesh.orchestrator.prompt_cache import DEFAULT_PROMPT_CACHE_MIB
from fluxmesh.orchestrator.residency.sequential import SEQUENTIAL_MAX_ACTIVE, SequentialStrategy
from fluxmesh.orchestrator.stages import DenoiserClient, EncoderClient, Stages, VaeClient
from fluxmesh.rpc.errors import check_range
from fluxmesh.rpc.images import MAX_IMAGE_BYTES
from fluxmesh.rpc.security import ClientSecurity, ServerSecurity
from fluxmesh.rpc.server import Server, Service
from fluxmesh.v1 import generator_pb2_grpc

# Room for the largest init image and mask the API accepts, plus prompts and the rest.
MAX_REQUEST_BYTES = 2 * MAX_IMAGE_BYTES + (1 << 20)
DEFAULT_REQUEST_TIMEOUT = 3600.0
# Requests through the stages at once with every stage resident: enough to fill the denoiser's
# batches (its --max-batch: 2 by default, more on a GPU) while others encode and decode. Each
# holds only its embeddings here (<= 8 MiB at T5 length 512).
RESIDENT_MAX_ACTIVE = 8


@dataclass(frozen=True)
class OrchestratorOptions:
    encoder: str
    denoiser: str
    vae: str
    address: str = "127.0.0.1:50050"
    max_active: int | None = None  # None: RESIDENT_MAX_ACTIVE, or SEQUENTIAL_MAX_ACTIVE in sequential mode
    max_queue: int = 32
    sequential: bool = False  # one accelerator: stages take turns (sequential.py)
    release_to: str = "auto"  # sequential mode: where released weights go (auto | cpu | disk)
    security: ServerSecurity = ServerSecurity()  # what public clients must present
    stage_security: ClientSecurity = ClientSecurity()  # what the orchestrator presents to stages
    metrics_port: int | None = None
    # The public API takes prompts and (for img2img) a few PNGs, never stage-sized tensors: a
    # much smaller limit than the stages' makes an oversized request cheap to refuse.
    max_request_bytes: int = MAX_REQUEST_BYTES
    request_timeout: float | None = DEFAULT_REQUEST_TIMEOUT  # for requests without a deadline
    priorities: PriorityPolicy = PriorityPolicy()  # how high each caller may set `priority`
    prompt_cache_bytes: int = DEFAULT_PROMPT_CACHE_MIB * 2**20  # prompt_cache.py; 0: off
    limits: Limits = LIMITS  # the request ceilings and work budget (--max-side, --max-work, ...)
    # Callers with one of these see counters, paths, `cached` and server faults in full (disclosure.py).
    admin_tokens: tuple[str, ...] = field(default=(), repr=False)

    def __post_init__(self) -> None:
        """Every limit range-checked at start: a 0 or negative one would refuse or hang everything."""
        check_range(
            "--max-active",
            self.max_active,
            minimum=1,
            allow_none=True,
            why="requests running through the stages at once",
        )
        check_range("--max-queue", self.max_queue, minimum=0, why="0: refuse whenever every slot is busy")
        check_range(
            "--request-timeout",
            self.request_timeout,
            minimum=0,
            inclusive=False,
            allow_none=True,
            why="seconds; 0 means none",
        )
        check_range("--max-request-mib", self.max_request_bytes / 2**20, minimum=1)
        check_range("--prompt-cache-mib", self.prompt_cache_bytes / 2**20, minimum=0, why="0: off")


def build_server(options: OrchestratorOptions) -> tuple[Server, StageMonitor]:
    secure = {"security": options.stage_security}
    stages = Stages(
        EncoderClient(options.encoder, **secure),
        DenoiserClient(options.denoiser, **secure),
        VaeClient(options.vae, **secure),
    )
    disclosure = Disclosure.of(options.security, options.admin_tokens)
    security = options.security
    if security.tokens:  # the admin tokens are client tokens too (an open orchestrator stays open)
        security = dataclasses.replace(security, tokens=(*security.tokens, *options.admin_tokens))
    residency = SequentialStrategy(stages.all(), options.release_to) if options.sequential else None
    max_active = options.max_active or (SEQUENTIAL_MAX_ACTIVE if options.sequential else RESIDENT_MAX_ACTIVE)
    queue = AdmissionQueue(max_active=max_active, max_waiting=options.max_queue)
    watch_queue(queue)
    servicer = GeneratorServicer(
        stages,
        queue,
        residency,
        request_timeout=options.request_timeout,
        priorities=options.priorities,
        prompt_cache_bytes=options.prompt_cache_bytes,
        limits=options.limits,
        disclosure=disclosure,
    )
    service = Service("fluxmesh.v1.Generator", servicer, generator_pb2_grpc.add_GeneratorServicer_to_server)
    server = Server(
        [service],
        address=options.address,
        security=security,
        max_receive_bytes=options.max_request_bytes,
        metrics_port=options.metrics_port,
        discloses=disclosure.full_view,
    )

    async def mirror(all_up: bool) -> None:
        # Overall and Generator health follow the stages; the process itself is alive either way.
        for name in ("", service.name):
            await server.set_serving(all_up, name)

    return server, StageMonitor(stages.all(), mirror, expect_resident=not options.sequential)


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
