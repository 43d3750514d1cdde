"""`fluxmesh serve ...`: run one fluxmesh process (a stage or the orchestrator) in the foreground."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from fluxmesh.cli.shared_options import (
    LOOPBACK_HOST,
    AdminTokenOptions,
    Compile,
    Host,
    LoraDir,
    MaxBatch,
    MaxLoraRank,
    MaxPriority,
    PromptCacheMib,
    ReleaseToOption,
    RequestLimits,
    Sequential,
    ServeOptions,
    StageClientOptions,
    StageServeOptions,
    T5Gguf,
    TransformerGguf,
    WarmupSizes,
    with_option_groups,
)
from fluxmesh.contract import ReleaseTo
from fluxmesh.orchestrator.priorities import DEFAULT_MAX_PRIORITY

app = typer.Typer(help="Serve one fluxmesh process.", no_args_is_help=True)

StageAddress = "host:port, several comma-separated (replicas), or dns:///name:port (round robin)"


def address(host: str, port: int) -> str:
    """`host:port`, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@contextlib.contextmanager
def start_errors_as_messages(process: str) -> Iterator[None]:
    """A port that is taken is the operator's to fix: one line naming it, exit 1, no traceback."""
    from fluxmesh.rpc.server import ServerStartError

    try:
        yield
    except ServerStartError as error:
        typer.echo(f"fluxmesh serve {process}: {error}", err=True)
        raise typer.Exit(1) from None


def _serve_stage(
    name: str, port: int, stage: StageServeOptions, serving: ServeOptions, *, dtype: str | None = None, **extra: Any
) -> None:
    security = serving.security()  # a bad flag fails here, before torch is even imported
    from fluxmesh.rpc.allocator import tune_for_tensor_traffic
    from fluxmesh.services.app import StageOptions, serve_stage

    tune_for_tensor_traffic()

    with start_errors_as_messages(name):
        serve_stage(
            StageOptions(
                stage=name,
                model=stage.model,
                address=address(stage.host, port),
                device=stage.device,
                dtype=dtype or stage.dtype,
                threads=stage.threads,
                residency=stage.residency.value,
                security=security,
                metrics_port=serving.metrics_port,
                **extra,
            )
        )


def _compile_options(enabled: bool, warmup_sizes: str | None, max_lora_rank: int | None = None) -> Any:
    """--compile and its flags as the stage's CompileOptions (imported here: it imports torch);
    a flag not given keeps CompileOptions' default."""
    from fluxmesh.rpc.errors import InvalidArgument
    from fluxmesh.services.runtime.compile import CompileOptions, parse_sizes

    given: dict[str, Any] = {"max_lora_rank": max_lora_rank} if max_lora_rank is not None else {}
    if warmup_sizes is not None:
        try:
            given["warmup_sizes"] = parse_sizes(warmup_sizes)
        except InvalidArgument as error:
            raise typer.BadParameter(str(error), param_hint="--warmup-sizes") from None
    return CompileOptions(enabled=enabled, **given)


@app.command("encoder")
@with_option_groups
def serve_encoder(
    stage: StageServeOptions,
    port: Annotated[int, typer.Option()] = 50051,
    max_sequence_length: Annotated[int | None, typer.Option(help="Default T5 length (512 dev, 256 schnell).")] = None,
    t5_gguf: T5Gguf = None,
    lora_dir: LoraDir = None,
    redux: Annotated[
        str | None,
        typer.Option(
            help="A FLUX.1-Redux folder (image_encoder/, feature_extractor/, image_embedder/) or Hub id: "
            "REDUX references become image prompts."
        ),
    ] = None,
    ip_adapter_image_encoder: Annotated[
        Path | None,
        typer.Option(
            help="A local CLIP vision model folder (CLIPVisionModelWithProjection, e.g. openai/clip-vit-large-patch14 "
            "downloaded): IP_ADAPTER references become image embeds (the denoiser needs --ip-adapter)."
        ),
    ] = None,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """CLIP-L + T5-XXL text encoder stage."""
    _serve_stage(
        "encoder",
        port,
        stage,
        serving,
        max_sequence_length=max_sequence_length,
        t5_gguf=t5_gguf,
        lora_dir=lora_dir,
        redux=redux,
        ip_adapter_image_encoder=ip_adapter_image_encoder,
    )


@app.command("denoiser")
@with_option_groups
def serve_denoiser(
    stage: StageServeOptions,
    port: Annotated[int, typer.Option()] = 50052,
    transformer_gguf: TransformerGguf = None,
    compute_dtype: Annotated[
        str | None, typer.Option(help="Dtype GGUF weights dequantize to (default: --dtype).")
    ] = None,
    lora_dir: LoraDir = None,
    max_batch: MaxBatch = None,
    step_cache: Annotated[
        str,
        typer.Option(
            help="Step caching for requests that ask none: off, first-block, mag or taylorseer, optionally :THRESHOLD."
        ),
    ] = "off",
    step_cache_ceiling: Annotated[
        float, typer.Option(help="Largest first-block/mag threshold a request may ask.")
    ] = 1.0,
    control_lora: Annotated[
        Path | None,
        typer.Option(
            help="A FLUX.1 Canny/Depth Control LoRA (.safetensors) fused into the base model: its x_embedder "
            "widens and CONTROL references are served, as FluxControlPipeline.load_lora_weights."
        ),
    ] = None,
    controlnet: Annotated[
        list[str] | None,
        typer.Option(
            help="A FluxControlNetModel folder or Hub id (InstantX, Union, XLabs diffusers layouts); repeatable: "
            "CONTROLNET references name them by position. Held and released with the transformer."
        ),
    ] = None,
    ip_adapter: Annotated[
        Path | None,
        typer.Option(
            help="An XLabs FLUX IP-Adapter file (ip_adapter.safetensors): its projection and attention processors "
            "serve IP_ADAPTER references (the encoder needs --ip-adapter-image-encoder)."
        ),
    ] = None,
    compile: Compile = False,
    warmup_sizes: WarmupSizes = None,
    max_lora_rank: MaxLoraRank = None,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """FLUX transformer stage (optionally GGUF-quantized, with per-request LoRAs)."""
    _serve_stage(
        "denoiser",
        port,
        stage,
        serving,
        dtype=compute_dtype,
        transformer_gguf=transformer_gguf,
        lora_dir=lora_dir,
        max_batch=max_batch,
        step_cache=step_cache,
        step_cache_ceiling=step_cache_ceiling,
        control_lora=control_lora,
        controlnets=tuple(controlnet or ()),
        ip_adapter=ip_adapter,
        compile=_compile_options(compile, warmup_sizes, max_lora_rank),
    )


@app.command("vae")
@with_option_groups
def serve_vae(
    stage: StageServeOptions,
    port: Annotated[int, typer.Option()] = 50053,
    depth_model: Annotated[
        Path | None,
        typer.Option(
            help="A transformers depth model folder (DepthAnything or DPT, safetensors): CONTROL references "
            "may ask preprocess depth."
        ),
    ] = None,
    compile: Compile = False,
    warmup_sizes: WarmupSizes = None,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """AutoencoderKL decoder stage."""
    _serve_stage("vae", port, stage, serving, depth_model=depth_model, compile=_compile_options(compile, warmup_sizes))


@app.command("orchestrator")
@with_option_groups
def serve_orchestrator(
    encoder: Annotated[str, typer.Option(help=f"Encoder stage: {StageAddress}.")] = "localhost:50051",
    denoiser: Annotated[str, typer.Option(help=f"Denoiser stage: {StageAddress}.")] = "localhost:50052",
    vae: Annotated[str, typer.Option(help=f"VAE stage: {StageAddress}.")] = "localhost:50053",
    port: Annotated[int, typer.Option()] = 50050,
    host: Host = LOOPBACK_HOST,
    max_active: Annotated[
        int | None,
        typer.Option(
            help="Requests running through the stages at once (default 8: enough to fill the denoiser's batches; "
            "8 with --sequential too, the group size that shares one round of swaps)."
        ),
    ] = None,
    sequential: Sequential = False,
    release_to: ReleaseToOption = ReleaseTo.auto,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before RESOURCE_EXHAUSTED.")] = 32,
    request_timeout: Annotated[
        float, typer.Option(help="Deadline (s) for requests that come without one; 0: none.")
    ] = 3600.0,
    max_request_mib: Annotated[
        int | None,
        typer.Option(
            help="Largest request message accepted (MiB); larger "
            "is RESOURCE_EXHAUSTED. Default: room for a "
            "32 MiB init image and mask (65)."
        ),
    ] = None,
    max_priority: MaxPriority = DEFAULT_MAX_PRIORITY,
    prompt_cache_mib: PromptCacheMib = None,
    serving: ServeOptions = ServeOptions(),
    admin: AdminTokenOptions = AdminTokenOptions(),
    stage_connections: StageClientOptions = StageClientOptions(),
    request_limits: RequestLimits = RequestLimits(),
) -> None:
    """The public Generator service (no torch)."""
    from fluxmesh.orchestrator.app import OrchestratorOptions
    from fluxmesh.orchestrator.app import serve_orchestrator as run
    from fluxmesh.rpc.allocator import tune_for_tensor_traffic

    tune_for_tensor_traffic()

    options = OrchestratorOptions(
        encoder=encoder,
        denoiser=denoiser,
        vae=vae,
        address=address(host, port),
        max_active=max_active,
        max_queue=max_queue,
        security=serving.security(),
        admin_tokens=admin.tokens(),
        stage_security=stage_connections.security(),
        metrics_port=serving.metrics_port,
        request_timeout=request_timeout or None,
        sequential=sequential,
        release_to=release_to.value,
        priorities=serving.priority_policy(max_priority),
        limits=request_limits.limits(),
        **({"max_request_bytes": max_request_mib * 2**20} if max_request_mib is not None else {}),
        **({"prompt_cache_bytes": prompt_cache_mib * 2**20} if prompt_cache_mib is not None else {}),
    )
    with start_errors_as_messages("orchestrator"):
        run(options)


from fluxmesh.cli.commands.serve_http import serve_http  # noqa: E402 (its own module: it imports no torch)

app.command("http")(serve_http)
