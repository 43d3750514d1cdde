"""The `fluxmesh` command line: serve stages, run them all locally, generate, make tiny models."""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(help="FLUX.1 image generation served as gRPC microservices.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
serve_app = typer.Typer(help="Serve one fluxmesh process.", no_args_is_help=True)
app.add_typer(serve_app, name="serve")

log = logging.getLogger("fluxmesh")


class Size(str, Enum):
    tiny = "tiny"
    small = "small"


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    # Logging first, before heavy imports, so a failing torch/diffusers import is logged.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s",
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


def _serve_stage(stage: str, model: str, host: str, port: int, device: str, dtype: str, threads: int | None,
                 **extra) -> None:
    from fluxmesh.services.app import StageOptions, serve_stage

    serve_stage(StageOptions(stage=stage, model=model, address=_address(host, port), device=device, dtype=dtype,
                             threads=threads, **extra))


@serve_app.command("encoder")
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
) -> None:
    """CLIP-L + T5-XXL text encoder stage."""
    _serve_stage("encoder", model, host, port, device, dtype, threads, max_sequence_length=max_sequence_length,
                 t5_gguf=t5_gguf, lora_dir=lora_dir)


@serve_app.command("denoiser")
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
) -> None:
    """FLUX transformer stage (optionally GGUF-quantized, with per-request LoRAs)."""
    _serve_stage("denoiser", model, host, port, device, compute_dtype or dtype, threads,
                 transformer_gguf=transformer_gguf, lora_dir=lora_dir)


@serve_app.command("vae")
def serve_vae(
    model: Model,
    port: Annotated[int, typer.Option()] = 50053,
    host: Host = "[::]",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
) -> None:
    """AutoencoderKL decoder stage."""
    _serve_stage("vae", model, host, port, device, dtype, threads)


@serve_app.command("orchestrator")
def serve_orchestrator(
    encoder: Annotated[str, typer.Option(help="Encoder stage address.")] = "localhost:50051",
    denoiser: Annotated[str, typer.Option(help="Denoiser stage address.")] = "localhost:50052",
    vae: Annotated[str, typer.Option(help="VAE stage address.")] = "localhost:50053",
    port: Annotated[int, typer.Option()] = 50050,
    host: Host = "[::]",
    max_active: Annotated[int, typer.Option(help="Requests running through the stages at once.")] = 2,
    max_queue: Annotated[int, typer.Option(help="Requests waiting before RESOURCE_EXHAUSTED.")] = 32,
) -> None:
    """The public Generator service (no torch)."""
    from fluxmesh.orchestrator.app import OrchestratorOptions, serve_orchestrator as run

    run(OrchestratorOptions(encoder=encoder, denoiser=denoiser, vae=vae, address=_address(host, port),
                            max_active=max_active, max_queue=max_queue))


def _stage_flags(device: str, dtype: str, threads: int | None) -> list[str]:
    flags = ["--device", device, "--dtype", dtype]
    return flags + (["--threads", str(threads)] if threads else [])


@app.command()
def up(
    model: Model,
    port: Annotated[int, typer.Option(help="Orchestrator port; stages take free ports.")] = 50050,
    host: Annotated[str, typer.Option(help="Interface for all four processes.")] = "127.0.0.1",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    transformer_gguf: TransformerGguf = None,
    t5_gguf: T5Gguf = None,
    lora_dir: LoraDir = None,
) -> None:
    """Start encoder, denoiser, vae and orchestrator locally; stop them all on exit."""
    import time

    from fluxmesh.cli.supervisor import start_local

    _raise_on_sigterm()
    cluster = start_local(model, port=port, host=host, common_args=_stage_flags(device, dtype, threads),
                          stage_args=_model_file_flags(transformer_gguf, t5_gguf, lora_dir))
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
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050",
    width: Annotated[int, typer.Option()] = 1024,
    height: Annotated[int, typer.Option()] = 1024,
    steps: Annotated[Optional[int], typer.Option(help="Default: 28 (dev) or 4 (schnell).")] = None,
    guidance: Annotated[Optional[float], typer.Option(help="Default 3.5; ignored by schnell.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Default: chosen by the server and printed.")] = None,
    num_images: Annotated[int, typer.Option()] = 1,
    prompt_2: Annotated[str, typer.Option(help="Separate T5 prompt.")] = "",
    lora: Annotated[Optional[list[str]], typer.Option(help="NAME[:WEIGHT] (repeatable; weight 1.0 by default).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("fluxmesh.png"),
    timeout: Annotated[Optional[float], typer.Option(help="Deadline in seconds.")] = None,
) -> None:
    """Generate image(s) through a running orchestrator, with a per-step progress bar."""
    from fluxmesh.cli.progress import follow
    from fluxmesh.client import Client, FluxmeshError
    from fluxmesh.client._core import parse_lora

    try:
        with Client(address, timeout=timeout) as client:
            result = follow(client.stream(prompt, prompt_2=prompt_2, width=width, height=height, steps=steps,
                                          guidance=guidance, seed=seed, num_images=num_images,
                                          loras=[parse_lora(text) for text in lora or []]))
    except FluxmeshError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    for path, data in zip(_parse_output(output, len(result.png)), result.png):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        typer.echo(str(path))


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write.")],
    schnell: Annotated[bool, typer.Option(help="FLUX.1-schnell style: no guidance embedding.")] = False,
    size: Annotated[Size, typer.Option(help="tiny (tests) or small (about 1 s per generation, benchmarks).")] = Size.tiny,
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Write a tiny random-weight FLUX model in the exact diffusers folder layout (offline)."""
    from fluxmesh.services.tiny_model import write_tiny_model

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
    from fluxmesh.services.tiny_model import write_tiny_model

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
def loras(address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050") -> None:
    """List the LoRAs the server offers (names for --lora)."""
    from fluxmesh.client import Client

    with Client(address) as client:
        for lora in client.list_loras():
            typer.echo(f"{lora.name}\t{lora.size_bytes / 2**20:.1f} MiB{'  (cached)' if lora.cached else ''}")


class QuantType(str, Enum):
    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K = "Q5_K"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_K = "Q4_K"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"


class Naming(str, Enum):
    bfl = "bfl"
    diffusers = "diffusers"


class Component(str, Enum):
    transformer = "transformer"
    t5 = "t5"


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
def health(
    address: Annotated[str, typer.Argument(help="host:port of any fluxmesh process.")],
    service: Annotated[str, typer.Option(help="Service name; empty for the whole server.")] = "",
    timeout: Annotated[float, typer.Option()] = 3.0,
) -> None:
    """Exit 0 when ADDRESS reports SERVING on grpc.health.v1, 1 otherwise (for health checks)."""
    from grpc_health.v1 import health_pb2

    from fluxmesh.cli.supervisor import health_status

    status = health_status(address, service, timeout)
    name = "UNREACHABLE" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)
    typer.echo(name)
    raise typer.Exit(0 if status == health_pb2.HealthCheckResponse.SERVING else 1)


@app.command()
def info(address: Annotated[str, typer.Option(help="Orchestrator address.")] = "localhost:50050") -> None:
    """What each stage holds: model, device, dtype, weight and peak memory."""
    from fluxmesh.client import Client

    with Client(address) as client:
        reply = client.info()
    for stage in reply.stages:
        typer.echo(f"{stage.stage:9s} {stage.model} on {stage.device} {stage.dtype}: "
                   f"weights {stage.weight_bytes / 2**20:.1f} MiB, peak {stage.peak_memory_bytes / 2**20:.1f} MiB")


def main() -> None:  # pragma: no cover - console entry point alias
    app(prog_name="fluxmesh")


if __name__ == "__main__":
    sys.exit(main())
