"""`fluxmesh up` and `fluxmesh demo`: all four processes on this machine, stopped together."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
from pathlib import Path
from typing import Annotated, TextIO

import typer

from fluxmesh.cli.commands.serve_http import HttpPort, serve_until_interrupted, start_gateway
from fluxmesh.cli.shared_options import (
    AdminTokenOptions,
    Device,
    Dtype,
    LoraDir,
    MaxBatch,
    MaxPriority,
    Model,
    PromptCacheMib,
    ReleaseToOption,
    RequestLimits,
    Sequential,
    ServeOptions,
    T5Gguf,
    Threads,
    TransformerGguf,
    with_option_groups,
)
from fluxmesh.contract import ReleaseTo, StartResidency
from fluxmesh.orchestrator.priorities import DEFAULT_MAX_PRIORITY
from fluxmesh.services.tools.tiny_model import ModelSize

app = typer.Typer()


@app.command()
@with_option_groups
def up(
    model: Model,
    port: Annotated[int, typer.Option(help="Orchestrator port; stages take free ports.")] = 50050,
    host: Annotated[
        str,
        typer.Option(
            help="Interface the orchestrator (the public API) listens on; the stages "
            "always listen on 127.0.0.1, reached by the orchestrator alone."
        ),
    ] = "127.0.0.1",
    device: Device = "auto",
    dtype: Dtype = "auto",
    threads: Threads = None,
    transformer_gguf: TransformerGguf = None,
    t5_gguf: T5Gguf = None,
    lora_dir: LoraDir = None,
    sequential: Sequential = False,
    release_to: ReleaseToOption = ReleaseTo.auto,
    max_priority: MaxPriority = DEFAULT_MAX_PRIORITY,
    prompt_cache_mib: PromptCacheMib = None,
    http_port: HttpPort = None,
    max_batch: MaxBatch = None,
    serving: ServeOptions = ServeOptions(),
    admin: AdminTokenOptions = AdminTokenOptions(),
    request_limits: RequestLimits = RequestLimits(),
) -> None:
    """Start encoder, denoiser, vae and orchestrator locally; restart one that dies; stop them all on exit.

    The TLS, token and metrics flags apply to the orchestrator, the one process others reach
    (and TLS to the HTTP gateway of --http-port, which passes callers' tokens on).
    """
    from fluxmesh.cli.supervisor import StartFailed, start_local

    serving.security()  # a bad TLS or token flag fails here, before four processes start
    admin.tokens()
    request_limits.limits()  # and a ceiling raised instead of lowered
    _check_model_files(model, transformer_gguf=transformer_gguf, t5_gguf=t5_gguf, lora_dir=lora_dir)
    raise_on_sigterm()
    try:
        cluster = start_local(
            model,
            port=port,
            host=host,
            common_args=_stage_flags(device, dtype, threads) + _sequential_stage_flags(sequential, release_to),
            stage_args=_model_file_flags(transformer_gguf, t5_gguf, lora_dir, max_batch),
            orchestrator_args=[
                *_sequential_flags(sequential, release_to),
                *serving.as_flags(),
                *admin.as_flags(),
                "--max-priority",
                str(max_priority),
                *request_limits.as_flags(),
                *(["--prompt-cache-mib", str(prompt_cache_mib)] if prompt_cache_mib is not None else []),
            ],
            orchestrator_tls=serving.tls_cert is not None,
        )
        with cluster:
            typer.echo(f"fluxmesh up: Generator on {cluster.address} (Ctrl-C to stop)", err=True)
            if http_port is not None:
                page = start_gateway(cluster, port=http_port, host=host, serving=serving)
                typer.echo(f"fluxmesh up: OpenAI images API and page on {page}", err=True)
            serve_until_interrupted(cluster, "up")
    except (StartFailed, TimeoutError) as error:  # the child's own error line is above this one
        typer.echo(f"fluxmesh up: {error}; stopped the others", err=True)
        raise typer.Exit(1) from None


@app.command()
def demo(
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("fluxmesh-demo.png"),
    prompt: Annotated[str, typer.Option("--prompt", "-p")] = "a red fox in the snow, highly detailed",
    model_dir: Annotated[Path | None, typer.Option(help="Where to write the tiny model (default: a temp dir).")] = None,
    size: Annotated[ModelSize, typer.Option()] = ModelSize.tiny,
    width: Annotated[int, typer.Option()] = 256,
    height: Annotated[int, typer.Option()] = 256,
    steps: Annotated[int, typer.Option()] = 8,
    seed: Annotated[int, typer.Option()] = 42,
    serve: Annotated[
        bool, typer.Option(help="Then keep serving, with the web page on --http-port, until Ctrl-C.")
    ] = False,
    http_port: Annotated[int, typer.Option(help="The page's port with --serve.")] = 8000,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="The four processes' logs on the terminal instead of in a file.")
    ] = False,
) -> None:
    """Tiny model + all four processes + one generation -> PNG. Needs no download and no GPU.

    Shows each process as it starts serving and a progress bar; the processes' logs go to a file
    it names (or, with --verbose, to the terminal).
    """
    from fluxmesh.cli.progress import follow
    from fluxmesh.cli.supervisor import Child, free_port, start_local
    from fluxmesh.client import Client
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    raise_on_sigterm()
    logs = None if verbose else _log_to_file("fluxmesh-demo-")

    def serving(child: Child) -> None:
        typer.echo(f"{child.name} SERVING on {child.address}", err=True)

    with tempfile.TemporaryDirectory(prefix="fluxmesh-demo-") as tmp:
        folder = write_tiny_model(model_dir or Path(tmp) / "tiny-flux", size=size)
        typer.echo(f"tiny model: {folder}", err=True)
        typer.echo(
            "starting encoder, denoiser, vae and orchestrator" + (f" (logs: {logs.name})" if logs else ""), err=True
        )
        try:
            cluster = start_local(str(folder), port=free_port(), output=logs, on_serving=serving)
        except (RuntimeError, TimeoutError) as error:
            typer.echo(f"fluxmesh demo: {error}" + (f" (see {logs.name})" if logs else ""), err=True)
            raise typer.Exit(1) from None
        with cluster, Client(cluster.address) as client:
            result = follow(client.stream(prompt, width=width, height=height, steps=steps, seed=seed))
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(result.image_data[0])
            typer.echo(str(output))
            if serve:
                page = start_gateway(cluster, port=http_port, host="127.0.0.1")
                typer.echo(f"fluxmesh demo: the page is on {page} (Ctrl-C to stop)", err=True)
                serve_until_interrupted(cluster, "demo")


def _check_model_files(
    model: str, *, transformer_gguf: Path | None, t5_gguf: Path | None, lora_dir: Path | None
) -> None:
    """What would stop a stage at start, said in one line before four processes start: a model
    that is neither a folder nor a Hub id, a missing GGUF file or LoRA directory. (A GGUF's
    contents are the stage's to judge: reading them needs the stages' libraries.)"""
    from fluxmesh.rpc.errors import UsageError
    from fluxmesh.services.runtime.model_folder import check_model

    check_model(model)
    for flag, path in (("--transformer-gguf", transformer_gguf), ("--t5-gguf", t5_gguf)):
        if path is not None and not path.is_file():
            raise UsageError(f"{flag} {path}: {'a directory' if path.is_dir() else 'no such file'}")
    if lora_dir is not None and not lora_dir.is_dir():
        raise UsageError(f"--lora-dir {lora_dir}: {'not a directory' if lora_dir.exists() else 'no such directory'}")


def _log_to_file(prefix: str) -> TextIO:
    """A new log file in the temp folder that this process's logging and its children's share
    (opened for appending, so the writers of one file description never overwrite each other)."""
    handle, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    logs = open(name, "a", buffering=1)  # open for the command's whole life
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(logs)
    logging.captureWarnings(True)  # library warnings are log lines too
    return logs


def raise_on_sigterm() -> None:
    """Turn SIGTERM into KeyboardInterrupt so `with cluster:` stops the children.

    A signal mask survives fork + exec, so a parent that blocked SIGINT/SIGTERM (some libraries'
    threads do, and a test runner's process then hands it to every child) would leave `up`
    deaf to Ctrl-C and to its supervisor's stop: unblock both and restore Ctrl-C's handler."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))


def _stage_flags(device: str, dtype: str, threads: int | None) -> list[str]:
    flags = ["--device", device, "--dtype", dtype]
    return flags + (["--threads", str(threads)] if threads else [])


def _sequential_stage_flags(sequential: bool, release_to: ReleaseTo) -> list[str]:
    """Stages start in the state sequential mode releases them to, so they never all load at once."""
    if not sequential:
        return []
    return ["--residency", StartResidency.for_release(release_to).value]


def _sequential_flags(sequential: bool, release_to: ReleaseTo) -> list[str]:
    return ["--sequential", "--release-to", release_to.value] if sequential else []


def _model_file_flags(
    transformer_gguf: Path | None, t5_gguf: Path | None, lora_dir: Path | None, max_batch: int | None = None
) -> dict[str, list[str]]:
    """Which stage gets which community file: GGUF transformer -> denoiser, GGUF T5 -> encoder,
    the LoRA directory -> both (CLIP-side keys are applied by the encoder); --max-batch -> denoiser."""
    flags: dict[str, list[str]] = {"encoder": [], "denoiser": []}
    if max_batch:
        flags["denoiser"] += ["--max-batch", str(max_batch)]
    if transformer_gguf:
        flags["denoiser"] += ["--transformer-gguf", str(transformer_gguf)]
    if t5_gguf:
        flags["encoder"] += ["--t5-gguf", str(t5_gguf)]
    if lora_dir:
        for stage in ("encoder", "denoiser"):
            flags[stage] += ["--lora-dir", str(lora_dir)]
    return flags
