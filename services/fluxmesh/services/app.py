"""`fluxmesh serve encoder|denoiser|vae`: load one stage's weights, then serve it."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fluxmesh.contract import Stage
from fluxmesh.rpc.errors import InvalidArgument, check_range
from fluxmesh.rpc.security import ServerSecurity
from fluxmesh.rpc.server import Server, Service
from fluxmesh.services.runtime.compile import CompileOptions
from fluxmesh.services.runtime.device import Device, configure_threads
from fluxmesh.services.runtime.model_folder import resolve_model

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageOptions:
    stage: str  # a fluxmesh.contract.Stage
    model: str
    address: str = "127.0.0.1:50051"
    device: str = "auto"
    dtype: str = "auto"
    threads: int | None = None
    max_sequence_length: int | None = None  # encoder only
    t5_gguf: Path | None = None  # encoder only
    redux: str | None = None  # encoder only: a FLUX.1-Redux folder or Hub id
    ip_adapter_image_encoder: Path | None = None  # encoder only: a local CLIP vision folder (IP-Adapter)
    ip_adapter: Path | None = None  # denoiser only: an XLabs ip_adapter.safetensors
    transformer_gguf: Path | None = None  # denoiser only
    control_lora: Path | None = None  # denoiser only: a FLUX.1 Canny/Depth LoRA on a base model
    controlnets: tuple[str, ...] = ()  # denoiser only: FluxControlNetModel folders or Hub ids, in order
    depth_model: Path | None = None  # vae only: a transformers depth model (CONTROL_PREPROCESS_DEPTH)
    max_batch: int | None = None  # denoiser only: rows per shared forward (None: contract.DEFAULT_MAX_BATCH)
    step_cache: str = "off"  # denoiser only: the default policy, KIND[:THRESHOLD] (step_cache.py)
    step_cache_ceiling: float = 1.0  # denoiser only: the largest threshold a request may ask
    lora_dir: Path | None = None  # encoder (CLIP-side keys) and denoiser
    compile: CompileOptions = CompileOptions()  # denoiser and vae: --compile, --warmup-sizes, --max-lora-rank
    security: ServerSecurity = ServerSecurity()  # TLS / mutual TLS / token the stage demands
    metrics_port: int | None = None  # Prometheus /metrics on this HTTP port
    residency: str = "resident"  # at start: a fluxmesh.contract.StartResidency

    def __post_init__(self) -> None:
        check_range("--threads", self.threads, minimum=1, allow_none=True)


def build_service(options: StageOptions) -> list[Service]:
    """The stage's service and its fluxmesh.v1.Residency service, which loads the weights (now,
    or when told: `options.residency`) and shares the stage's model thread. Residency control
    (Load/Release) is on where the stage demands a credential or starts for sequential mode."""
    from fluxmesh.services.residency.servicer import residency_service
    from fluxmesh.services.residency.state import RESIDENT, Residency

    stage = _stage_service(options)
    residency = Residency(options.stage, stage.servicer.engine, options.residency)
    control = options.security.authenticates or options.residency != RESIDENT
    return [stage, residency_service(residency, stage.servicer.worker, control=control)]


def _stage_service(options: StageOptions) -> Service:
    """The stage's engine (weights not read yet) wrapped in its servicer."""
    try:
        build = _STAGES[Stage(options.stage)]
    except ValueError:
        raise InvalidArgument("stage", f"{options.stage!r}; expected one of {', '.join(Stage)}") from None
    device = Device.parse(options.device, options.dtype)
    configure_threads(options.threads, device)
    return build(options, resolve_model(options.model, options.stage), device)


# Each stage's engine and servicer, imported only when that stage is the one served.


def _encoder(options: StageOptions, folder: Path, device: Device) -> Service:
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.encoder.servicer import TextEncoderServicer
    from fluxmesh.v1 import encoder_pb2_grpc

    redux = resolve_model(options.redux, "redux") if options.redux else None
    engine = TextEncoderEngine(
        folder,
        device,
        max_sequence_length=options.max_sequence_length,
        t5_gguf=options.t5_gguf,
        lora_dir=options.lora_dir,
        redux=redux,
        ip_adapter_image_encoder=options.ip_adapter_image_encoder,
        load=False,
    )
    return Service(
        "fluxmesh.v1.TextEncoder",
        TextEncoderServicer(engine, options.model),
        encoder_pb2_grpc.add_TextEncoderServicer_to_server,
    )


def _denoiser(options: StageOptions, folder: Path, device: Device) -> Service:
    from fluxmesh.services.denoiser.controlnet import resolve_controlnet
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.denoiser.servicer import DenoiserServicer
    from fluxmesh.services.denoiser.step_cache import StepCacheLimits, parse_policy
    from fluxmesh.v1 import denoiser_pb2_grpc

    limits = StepCacheLimits(parse_policy(options.step_cache), options.step_cache_ceiling)
    limits.resolve(None)  # a default above the ceiling fails at start, not per request
    engine = DenoiserEngine(
        folder,
        device,
        transformer_gguf=options.transformer_gguf,
        lora_dir=options.lora_dir,
        step_cache=limits,
        control_lora=options.control_lora,
        controlnets=[resolve_controlnet(source) for source in options.controlnets],
        ip_adapter=options.ip_adapter,
        compile=options.compile,
        load=False,
    )
    batching = {"max_batch": options.max_batch} if options.max_batch else {}
    return Service(
        "fluxmesh.v1.Denoiser",
        DenoiserServicer(engine, options.model, **batching),
        denoiser_pb2_grpc.add_DenoiserServicer_to_server,
    )


def _vae(options: StageOptions, folder: Path, device: Device) -> Service:
    from fluxmesh.services.vae.engine import VaeEngine
    from fluxmesh.services.vae.servicer import VaeServicer
    from fluxmesh.v1 import vae_pb2_grpc

    engine = VaeEngine(folder, device, depth_model=options.depth_model, compile=options.compile, load=False)
    return Service("fluxmesh.v1.Vae", VaeServicer(engine, options.model), vae_pb2_grpc.add_VaeServicer_to_server)


_STAGES: dict[Stage, Callable[[StageOptions, Path, Device], Service]] = {
    Stage.encoder: _encoder,
    Stage.denoiser: _denoiser,
    Stage.vae: _vae,
}


def serve_stage(options: StageOptions) -> None:
    from fluxmesh.services.runtime.worker import compute_executor

    options.security.credentials()  # unreadable TLS files fail now, not after loading weights
    # Load on the thread that will run the model: see fluxmesh.services.worker.
    services = compute_executor().submit(build_service, options).result()

    async def main() -> None:
        from fluxmesh.services.runtime.metrics import watch_stage

        stage = services[0].servicer
        watch_stage(options.stage, stage.engine)
        server = Server(services, address=options.address, security=options.security, metrics_port=options.metrics_port)
        if not options.compile.enabled:
            await server.serve_until_signalled()
            return
        # Health says NOT_SERVING until the compiled model is warm: no request waits for a compile.
        await server.start(serving=False)
        warm_up = asyncio.ensure_future(_warm_up(stage, server))
        await server.wait_for_signal()
        warm_up.cancel()

    asyncio.run(main())


async def _warm_up(stage, server: Server) -> None:
    """The stage's warm-up on its model thread, then SERVING; a failed one stops the stage."""
    try:
        await stage.worker.run_unchecked(stage.warm_up)
    except Exception:
        log.exception("warm-up failed; stopping")
        server.request_stop()
        return
    await server.set_all_serving(True)
