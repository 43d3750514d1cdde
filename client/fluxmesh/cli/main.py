"""The `fluxmesh` command line: serve stages, run them all locally, generate, make tiny models."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from fluxmesh.cli.lifeline import die_with_parent_if_asked
from fluxmesh.cli.shared_options import ClientOptions, ServeOptions, StageClientOptions, with_option_groups
from fluxmesh.orchestrator.priorities import DEFAULT_MAX_PRIORITY

app = typer.Typer(help="FLUX.1 image generation served as gRPC microservices.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
serve_app = typer.Typer(help="Serve one fluxmesh process.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")

log = logging.getLogger("fluxmesh")


class PreviewKind(str, Enum):
    fast = "fast"
    vae = "vae"


class Size(str, Enum):
    tiny = "tiny"
    small = "small"


class Residency(str, Enum):
    """Where a stage's weights are when it starts (fluxmesh.services.residency.state)."""

    resident = "resident"
    offloaded = "offloaded"
    released = "released"
    standby = "standby"


class ReleaseTo(str, Enum):
    """Sequential mode: where released weights go (fluxmesh.orchestrator.residency.sequential.ReleaseTo)."""

    auto = "auto"
    cpu = "cpu"
    disk = "disk"


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    die_with_parent_if_asked()  # before anything slow: `fluxmesh up` may be gone already
    # Logging first, before heavy imports, so a failing torch/diffusers import is logged.
    from fluxmesh.rpc.request_ids import install_log_field

    install_log_field()  # every line names the request it is about ("-" when none)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s [%(request_id)s]: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Weight-loading progress bars and library chatter would bury the stage logs of four processes.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


Model = Annotated[str, typer.Option(help="Diffusers-layout model folder or Hub id (HF_TOKEN for gated models).")]
Host = Annotated[str, typer.Option(help="Interface to listen on.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), bfloat16, float16 or float32.")]
Threads = Annotated[Optional[int], typer.Option(help="torch CPU threads for this process (default: torch's).")]
LoraDir = Annotated[Optional[Path], typer.Option(help="Directory of LoRA .safetensors files requests may name.")]
TransformerGguf = Annotated[Optional[Path], typer.Option(help="GGUF-quantized FLUX transformer (city96/BFL or diffusers names).")]
T5Gguf = Annotated[Optional[Path], typer.Option(help="GGUF-quantized T5-XXL encoder (t5encoder architecture).")]
StartResidency = Annotated[Residency, typer.Option(
    help="Weights at start: resident (on --device), offloaded (CPU memory), released (not read until "
         "Residency.Load), standby (offloaded on an accelerator, released on CPU: what sequential mode uses).")]
Sequential = Annotated[bool, typer.Option(
    help="One accelerator for all stages: only one stage's weights on it at a time, requests grouped by phase.")]
ReleaseToOption = Annotated[ReleaseTo, typer.Option(
    help="Sequential mode: released weights stay in CPU memory (cpu), are freed and read from disk again (disk), "
         "or auto: cpu for stages on an accelerator, disk for stages on the CPU.")]
StageAddress = "host:port, several comma-separated (replicas), or dns:///name:port (round robin)"
MaxPriority = Annotated[int, typer.Option(
    help="Highest request priority a caller may use (lower is always allowed); a token file line "
         "'TOKEN max-priority=N' gives that token its own.")]


def _serve_stage(stage: str, model: str, host: str, port: int, device: str, dtype: str, threads: int | None,
                 serving: ServeOptions, **extra) -> None:
    security = serving.security()  # a bad flag fails here, before torch is even imported
    from fluxmesh.rpc.allocator import tune_for_tensor_traffic
    from fluxmesh.services.app import StageOptions, serve_stage

    tune_for_tensor_traffic()

    with _start_errors_as_messages(stage):
        serve_stage(StageOptions(stage=stage, model=model, address=_address(host, port), device=device, dtype=dtype,
                                 threads=threads, security=security, metrics_port=serving.metrics_port, **extra))


@contextlib.contextmanager
def _start_errors_as_messages(process: str):
    """A port that is taken is the operator's to fix: one line naming it, exit 1, no traceback."""
    from fluxmesh.rpc.server import ServerStartError

    try:
        yield
    except ServerStartError as error:
        typer.echo(f"fluxmesh serve {process}: {error}", err=True)
        raise typer.Exit(1) from None


@serve_app.command("encoder")
@with_option_groups
def serve_encoder(
    model: Model,
    port: Annotated[int, typer.Option()] = 50051,
    host: Host = "[::]",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="Default T5 length (512 dev, 256 schnell).")] = None,
    t5_gguf: T5Gguf = None,
    lora_dir: LoraDir = None,
    residency: StartResidency = Residency.resident,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """CLIP-L + T5-XXL text encoder stage."""
    _serve_stage("encoder", model, host, port, device, dtype, threads, serving, max_sequence_length=max_sequence_length,
                 t5_gguf=t5_gguf, lora_dir=lora_dir, residency=residency.value)


@serve_app.command("denoiser")
@with_option_groups
def serve_denoiser(
    model: Model,
    port: Annotated[int, typer.Option()] = 50052,
    host: Host = "[::]",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    transformer_gguf: TransformerGguf = None,
    compute_dtype: Annotated[Optional[str], typer.Option(help="Dtype GGUF weights dequantize to (default: --dtype).")] = None,
    lora_dir: LoraDir = None,
    residency: StartResidency = Residency.resident,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """FLUX transformer stage (optionally GGUF-quantized, with per-request LoRAs)."""
    _serve_stage("denoiser", model, host, port, device, compute_dtype or dtype, threads, serving,
                 transformer_gguf=transformer_gguf, lora_dir=lora_dir, residency=residency.value)


@serve_app.command("vae")
@with_option_groups
def serve_vae(
    model: Model,
    port: Annotated[int, typer.Option()] = 50053,
    host: Host = "[::]",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    residency: StartResidency = Residency.resident,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """AutoencoderKL decoder stage."""
    _serve_stage("vae", model, host, port, device, dtype, threads, serving, residency=residency.value)


@serve_app.command("orchestrator")
@with_option_groups
def serve_orchestrator(
    encoder: Annotated[str, typer.Option(help=f"Encoder stage: {StageAddress}.")] = "localhost:50051",
    denoiser: Annotated[str, typer.Option(help=f"Denoiser stage: {StageAddress}.")] = "localhost:50052",
    vae: Annotated[str, typer.Option(help=f"VAE stage: {StageAddress}.")] = "localhost:50053",
    port: Annotated[int, typer.Option()] = 50050,
    host: Host = "[::]",
    max_active: Annotated[Optional[int], typer.Option(
        help="Requests running through the stages at once (default 2; 8 with --sequential, the group size "
             "that shares one round of swaps).")] = None,
    sequential: Sequential = False,
    release_to: ReleaseToOption = ReleaseTo.auto,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before RESOURCE_EXHAUSTED.")] = 32,
    request_timeout: Annotated[float, typer.Option(help="Deadline (s) for requests that come without one; "
                                                        "0: none.")] = 3600.0,
    max_request_mib: Annotated[Optional[int], typer.Option(help="Largest request message accepted (MiB); larger "
                                                                "is RESOURCE_EXHAUSTED. Default: room for a "
                                                                "32 MiB init image and mask (65).")] = None,
    max_priority: MaxPriority = DEFAULT_MAX_PRIORITY,
    serving: ServeOptions = ServeOptions(),
    stage_connections: StageClientOptions = StageClientOptions(),
) -> None:
    """The public Generator service (no torch)."""
    from fluxmesh.orchestrator.app import OrchestratorOptions, serve_orchestrator as run
    from fluxmesh.rpc.allocator import tune_for_tensor_traffic

    tune_for_tensor_traffic()

    options = OrchestratorOptions(encoder=encoder, denoiser=denoiser, vae=vae, address=_address(host, port),
                                  max_active=max_active, max_queue=max_queue, security=serving.security(),
                                  stage_security=stage_connections.security(), metrics_port=serving.metrics_port,
                                  request_timeout=request_timeout or None, sequential=sequential,
                                  release_to=release_to.value, priorities=serving.priority_policy(max_priority),
                                  **({"max_request_bytes": max_request_mib * 2**20} if max_request_mib else {}))
    with _start_errors_as_messages("orchestrator"):
        run(options)


def _stage_flags(device: str, dtype: str, threads: int | None) -> list[str]:
    flags = ["--device", device, "--dtype", dtype]
    return flags + (["--threads", str(threads)] if threads else [])


@app.command()
@with_option_groups
def up(
    model: Model,
    port: Annotated[int, typer.Option(help="Orchestrator port; stages take free ports.")] = 50050,
    host: Annotated[str, typer.Option(help="Interface the orchestrator (the public API) listens on; the stages "
                                           "always listen on 127.0.0.1, reached by the orchestrator alone.")]
    = "127.0.0.1",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    transformer_gguf: TransformerGguf = None,
    t5_gguf: T5Gguf = None,
    lora_dir: LoraDir = None,
    sequential: Sequential = False,
    release_to: ReleaseToOption = ReleaseTo.auto,
    max_priority: MaxPriority = DEFAULT_MAX_PRIORITY,
    serving: ServeOptions = ServeOptions(),
) -> None:
    """Start encoder, denoiser, vae and orchestrator locally; stop them all on exit.

    The TLS, token and metrics flags apply to the orchestrator, the one process others reach.
    """
    import time

    from fluxmesh.cli.supervisor import start_local

    serving.security()  # a bad TLS or token flag fails here, before four processes start
    _raise_on_sigterm()
    cluster = start_local(model, port=port, host=host,
                          common_args=_stage_flags(device, dtype, threads) + _sequential_stage_flags(sequential, release_to),
                          stage_args=_model_file_flags(transformer_gguf, t5_gguf, lora_dir),
                          orchestrator_args=[*_sequential_flags(sequential, release_to), *serving.as_flags(),
                                             "--max-priority", str(max_priority)],
                          orchestrator_tls=serving.tls_cert is not None)
    with cluster:
        typer.echo(f"fluxmesh up: Generator on {cluster.address} (Ctrl-C to stop)", err=True)
        try:
            while all(c.process.poll() is None for c in cluster.children):
                time.sleep(0.5)
        except KeyboardInterrupt:
            pass
        dead = [c.name for c in cluster.children if c.process.poll() is not None]
        if dead:
            typer.echo(f"fluxmesh up: {', '.join(dead)} exited; stopping the rest", err=True)
            raise typer.Exit(1)


def _sequential_stage_flags(sequential: bool, release_to: ReleaseTo) -> list[str]:
    """Stages start in the state sequential mode releases them to, so they never all load at once."""
    if not sequential:
        return []
    start = {ReleaseTo.auto: Residency.standby, ReleaseTo.cpu: Residency.offloaded, ReleaseTo.disk: Residency.released}
    return ["--residency", start[release_to].value]


def _sequential_flags(sequential: bool, release_to: ReleaseTo) -> list[str]:
    return ["--sequential", "--release-to", release_to.value] if sequential else []


def _model_file_flags(transformer_gguf: Path | None, t5_gguf: Path | None, lora_dir: Path | None) -> dict[str, list[str]]:
    """Which stage gets which community file: GGUF transformer -> denoiser, GGUF T5 -> encoder,
    the LoRA directory -> both (CLIP-side keys are applied by the encoder)."""
    flags: dict[str, list[str]] = {"encoder": [], "denoiser": []}
    if transformer_gguf:
        flags["denoiser"] += ["--transformer-gguf", str(transformer_gguf)]
    if t5_gguf:
        flags["encoder"] += ["--t5-gguf", str(t5_gguf)]
    if lora_dir:
        for stage in ("encoder", "denoiser"):
            flags[stage] += ["--lora-dir", str(lora_dir)]
    return flags


def _raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `with cluster:` stops the children."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def _parse_output(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


@app.command()
@with_option_groups
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050",
    width: Annotated[int, typer.Option(help="Default 1024, or the init image's width.")] = 0,
    height: Annotated[int, typer.Option(help="Default 1024, or the init image's height.")] = 0,
    steps: Annotated[Optional[int], typer.Option(help="Default: 28 (dev) or 4 (schnell).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Default 3.5; ignored by schnell.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Default: chosen by the server and printed.")] = None,
    num_images: Annotated[int, typer.Option()] = 1,
    prompt_2: Annotated[str, typer.Option(help="Separate T5 prompt.")] = "",
    lora: Annotated[Optional[list[str]], typer.Option(help="NAME[:WEIGHT] (repeatable; weight 1.0 by default).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("fluxmesh.png"),
    timeout: Annotated[Optional[float], typer.Option(help="Deadline in seconds.")] = None,
    init_image: Annotated[Optional[Path], typer.Option(help="PNG/JPEG to start from (image to image).")] = None,
    strength: Annotated[Optional[float], typer.Option(help="How much of the init image to repaint, in (0, 1] "
                                                           "(default 0.6; 1.0 for FLUX.1-Fill).")] = None,
    mask: Annotated[Optional[Path], typer.Option(help="PNG/JPEG mask, white = repaint (inpainting).")] = None,
    preview: Annotated[Optional[PreviewKind], typer.Option(help="Live previews: fast (latents to RGB) or vae.")] = None,
    preview_every: Annotated[int, typer.Option(help="A preview every N steps.")] = 1,
    preview_dir: Annotated[Optional[Path], typer.Option(help="Where previews go (default: OUTPUT's name + "
                                                             "'-previews').")] = None,
    priority: Annotated[int, typer.Option(help="Place in line: higher runs first (up to what the server "
                                               "allows this caller), lower lets others go first.")] = 0,
    negative_prompt: Annotated[Optional[str], typer.Option(help="True CFG: what to steer away from (may be "
                                                                "''); needs --true-cfg-scale > 1.")] = None,
    true_cfg_scale: Annotated[Optional[float], typer.Option(help="True CFG scale, as FluxPipeline's (1: off; "
                                                                 "> 1 runs the negative prompt too, twice the "
                                                                 "cost per step).")] = None,
    connection: ClientOptions = ClientOptions(),
) -> None:
    """Generate image(s) through a running orchestrator, with a per-step progress bar."""
    from fluxmesh.cli.progress import follow
    from fluxmesh.client import Client, FluxmeshError
    from fluxmesh.cli.previews import PreviewWriter
    from fluxmesh.client._core import parse_lora

    try:
        with Client(address, timeout=timeout, **connection.client_kwargs()) as client:
            writer = PreviewWriter(preview_dir or output.with_name(f"{output.stem}-previews")) if preview else None
            result = follow(client.stream(prompt, prompt_2=prompt_2, width=width, height=height, steps=steps,
                                          guidance=guidance, seed=seed, num_images=num_images,
                                          loras=[parse_lora(text) for text in lora or []],
                                          init_image=init_image, mask_image=mask, strength=strength,
                                          preview=preview.value if preview else None, preview_every=preview_every,
                                          priority=priority, negative_prompt=negative_prompt,
                                          true_cfg_scale=true_cfg_scale),
                            previews=writer)
    except FluxmeshError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for path, data in zip(_parse_output(output, len(result.png)), result.png):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        typer.echo(str(path))
    if writer is not None and writer.written:
        typer.echo(f"{writer.written} previews in {writer.directory}", err=True)


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write.")],
    schnell: Annotated[bool, typer.Option(help="FLUX.1-schnell style: no guidance embedding.")] = False,
    size: Annotated[Size, typer.Option(help="tiny (tests) or small (about 1 s per generation, benchmarks).")] = Size.tiny,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a tiny random-weight FLUX model in the exact diffusers folder layout (offline)."""
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    typer.echo(str(write_tiny_model(directory, schnell=schnell, size=size.value, seed=seed)))


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("fluxmesh-demo.png"),
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "a red fox in the snow, highly detailed",
    model_dir: Annotated[Optional[Path], typer.Option(help="Where to write the tiny model (default: a temp dir).")] = None,
    size: Annotated[Size, typer.Option()] = Size.tiny,
    width: Annotated[int, typer.Option()] = 256,
    height: Annotated[int, typer.Option()] = 256,
    steps: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 42,
) -> None:
    """Tiny model + all four processes + one generation -> PNG. Needs no download and no GPU."""
    from fluxmesh.cli.progress import follow
    from fluxmesh.cli.supervisor import free_port, start_local
    from fluxmesh.client import Client
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    _raise_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="fluxmesh-demo-") as tmp:
        folder = write_tiny_model(model_dir or Path(tmp) / "tiny-flux", size=size.value)
        typer.echo(f"tiny model: {folder}", err=True)
        with start_local(str(folder), port=free_port()) as cluster, Client(cluster.address) as client:
            result = follow(client.stream(prompt, width=width, height=height, steps=steps, seed=seed))
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.png[0])
    typer.echo(str(output))


@app.command()
@with_option_groups
def loras(
    address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050",
    connection: ClientOptions = ClientOptions(),
) -> None:
    """List the LoRAs the server offers (names for --lora)."""
    from fluxmesh.client import Client

    with Client(address, **connection.client_kwargs()) as client:
        for lora in client.list_loras():
            typer.echo(f"{lora.name}\t{lora.size_bytes / 2**20:.1f} MiB{'  (cached)' if lora.cached else ''}")


from fluxmesh.services.gguf.types import Component, Naming, QuantType  # noqa: E402 (no heavy imports)


@app.command()
def quantize(
    source: Annotated[Path, typer.Argument(help="Model folder, its transformer/ folder, or a BFL .safetensors file.")],
    output: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    type: Annotated[QuantType, typer.Option("--type", "-t", help="Quantization type.")] = QuantType.Q8_0,
    naming: Annotated[Naming, typer.Option(help="Tensor names: bfl (as community files) or diffusers.")] = Naming.bfl,
    component: Annotated[Component, typer.Option(help="transformer, or t5 (the text_encoder_2 of a model folder).")] = Component.transformer,
) -> None:
    """Write a GGUF file in the community (city96) layout, loadable by fluxmesh, ComfyUI-GGUF and diffusers."""
    from fluxmesh.rpc.errors import FluxmeshError
    from fluxmesh.services.gguf import quantize_cli

    try:
        typer.echo(str(quantize_cli(source, output, type.value, naming.value, component.value)))
    except FluxmeshError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None


@app.command()
@with_option_groups
def health(
    address: Annotated[str, typer.Argument(help="host:port of any fluxmesh process.")],
    service: Annotated[str, typer.Option(help="Service name; empty for the whole server.")] = "",
    timeout: Annotated[float, typer.Option()] = 3.0,
    connection: ClientOptions = ClientOptions(),
) -> None:
    """Exit 0 when ADDRESS reports SERVING on grpc.health.v1, 1 otherwise (for health checks)."""
    from grpc_health.v1 import health_pb2

    from fluxmesh.cli.supervisor import health_status

    status = health_status(address, service, timeout, credentials=connection.security().credentials())
    name = "UNREACHABLE" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    typer.echo(name)
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command()
@with_option_groups
def info(
    address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050",
    connection: ClientOptions = ClientOptions(),
) -> None:
    """What each stage holds: model, device, dtype, weight and peak memory."""
    from fluxmesh.client import Client

    with Client(address, **connection.client_kwargs()) as client:
        reply = client.info()
    for stage in reply.stages:
        typer.echo(f"{stage.stage:9s} {stage.model} on {stage.device} {stage.dtype}: "
                   f"weights {stage.weight_bytes / 2**20:.1f} MiB, peak {stage.peak_memory_bytes / 2**20:.1f} MiB"
                   + (f", {stage.residency}" if stage.residency else ""))


class PlanDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
def plan(
    model: Annotated[Path, typer.Option(help="Local diffusers-layout model folder (only file headers are read).")],
    vram: Annotated[str, typer.Option(help="Memory of one accelerator, e.g. 16GiB, 24GB, 12.5G.")] = "16GiB",
    width: Annotated[int, typer.Option()] = 1024,
    height: Annotated[int, typer.Option()] = 1024,
    num_images: Annotated[int, typer.Option(help="Images per request (the denoiser and VAE batch).")] = 1,
    dtype: Annotated[PlanDtype, typer.Option(help="Dtype the stages load weights in (compute dtype for GGUF).")]
        = PlanDtype.bfloat16,
    transformer_gguf: TransformerGguf = None,
    t5_gguf: T5Gguf = None,
    max_sequence_length: Annotated[Optional[int], typer.Option(help="T5 length (default: 512 dev, 256 schnell).")]
        = None,
    context_overhead: Annotated[str, typer.Option(help="CUDA context per stage process, outside torch's "
                                                       "allocator.")] = "0.5GiB",
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Each stage's weights (from the files) and activations (from the resolution), and which
    placements fit an accelerator of --vram: all resident, sequential, encoder on CPU, one per
    stage, or which transformer quantization is needed."""
    import json

    from fluxmesh.rpc.errors import FluxmeshError
    from fluxmesh.services.tools.planning import make_plan, parse_size

    try:
        result = make_plan(model, vram=parse_size(vram), width=width, height=height, num_images=num_images,
                           dtype=dtype.value, transformer_gguf=transformer_gguf, t5_gguf=t5_gguf,
                           max_sequence_length=max_sequence_length,
                           context_bytes=parse_size(context_overhead, "context_overhead"))
    except FluxmeshError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.describe())


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="fluxmesh")


if __name__ == "__main__":
    sys.exit(main())
