"""Commands that call a running server: generate, loras, info, health."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from fluxmesh.cli.shared_options import Address, ClientOptions, with_option_groups
from fluxmesh.client.options import Reference, option_help, parse_lora
from fluxmesh.contract import ControlPreprocess, PreviewKind, ReferenceRole

app = typer.Typer()


def _output_paths(output: Path, count: int) -> list[Path]:
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


@app.command()
@with_option_groups
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p")],
    address: Address = "localhost:50050",
    width: Annotated[int, typer.Option(help=option_help("width"))] = 0,
    height: Annotated[int, typer.Option(help=option_help("height"))] = 0,
    steps: Annotated[int | None, typer.Option(help=option_help("steps"))] = None,
    guidance: Annotated[float | None, typer.Option(help=option_help("guidance"))] = None,
    seed: Annotated[int | None, typer.Option(help="Default: chosen by the server and printed.")] = None,
    num_images: Annotated[int, typer.Option(help=option_help("num_images"))] = 1,
    prompt_2: Annotated[str, typer.Option(help=option_help("prompt_2"))] = "",
    lora: Annotated[list[str] | None, typer.Option(help="NAME[:WEIGHT] (repeatable; weight 1.0 by default).")] = None,
    output: Annotated[Path, typer.Option("--output", "-o")] = Path("fluxmesh.png"),
    timeout: Annotated[float | None, typer.Option(help="Deadline in seconds.")] = None,
    init_image: Annotated[Path | None, typer.Option(help="PNG/JPEG to start from (image to image).")] = None,
    strength: Annotated[float | None, typer.Option(help=option_help("strength"))] = None,
    mask: Annotated[Path | None, typer.Option(help="PNG/JPEG mask, white = repaint (inpainting).")] = None,
    preview: Annotated[PreviewKind | None, typer.Option(help="Live previews: fast (latents to RGB) or vae.")] = None,
    preview_every: Annotated[int, typer.Option(help=option_help("preview_every"))] = 1,
    preview_dir: Annotated[
        Path | None, typer.Option(help="Where previews go (default: OUTPUT's name + '-previews').")
    ] = None,
    priority: Annotated[int, typer.Option(help=option_help("priority"))] = 0,
    negative_prompt: Annotated[
        str | None, typer.Option(help="True CFG: what to steer away from (may be ''); needs --true-cfg-scale > 1.")
    ] = None,
    true_cfg_scale: Annotated[float | None, typer.Option(help=option_help("true_cfg_scale"))] = None,
    cache: Annotated[str | None, typer.Option(help=option_help("cache"))] = None,
    reference: Annotated[
        Path | None,
        typer.Option(
            help="PNG/JPEG for a FLUX.1-Kontext model to edit (snapped to "
            "Kontext's preferred resolutions unless --keep-size)."
        ),
    ] = None,
    keep_size: Annotated[bool, typer.Option(help="--reference keeps its own size.")] = False,
    image_prompt: Annotated[
        list[str] | None,
        typer.Option(help="PATH[:SCALE]: a Redux image prompt (repeatable; the encoder needs --redux)."),
    ] = None,
    control: Annotated[Path | None, typer.Option(help="PNG/JPEG control image for a FLUX.1 Canny/Depth model.")] = None,
    control_type: Annotated[
        ControlPreprocess,
        typer.Option(
            help="What the server makes of --control first: none (use it as it is), canny (edges) or depth "
            "(a depth map; the vae stage needs --depth-model)."
        ),
    ] = ControlPreprocess.none,
    controlnet_image: Annotated[
        list[str] | None,
        typer.Option(
            help="PATH[:KEY=VALUE,...]: a control image for one of the denoiser's ControlNets (repeatable; several "
            "make a multi-ControlNet). Keys: net (which ControlNet, default 0), mode (union mode), scale, start, end "
            "(control guidance span), preprocess (none or canny). E.g. edges.png:mode=0,scale=0.7,end=0.8"
        ),
    ] = None,
    ip_adapter_image: Annotated[
        str | None,
        typer.Option(
            help="PATH[:SCALE]: an XLabs IP-Adapter image prompt, scale in [0, 2] (default 1; the denoiser needs "
            "--ip-adapter, the encoder --ip-adapter-image-encoder)."
        ),
    ] = None,
    negative_ip_adapter_image: Annotated[
        Path | None,
        typer.Option(help="True CFG: the IP-Adapter's negative image prompt (default: a black image, as diffusers)."),
    ] = None,
    connection: ClientOptions = ClientOptions(),
) -> None:
    """Generate image(s) through a running orchestrator, with a per-step progress bar."""
    from fluxmesh.cli.previews import PreviewWriter
    from fluxmesh.cli.progress import follow
    from fluxmesh.client import Client, FluxmeshError

    try:
        with Client(address, timeout=timeout, **connection.client_kwargs()) as client:
            writer = PreviewWriter(preview_dir or output.with_name(f"{output.stem}-previews")) if preview else None
            result = follow(
                client.stream(
                    prompt,
                    prompt_2=prompt_2,
                    width=width,
                    height=height,
                    steps=steps,
                    guidance=guidance,
                    seed=seed,
                    num_images=num_images,
                    loras=[parse_lora(text) for text in lora or []],
                    init_image=init_image,
                    mask_image=mask,
                    strength=strength,
                    preview=preview,
                    preview_every=preview_every,
                    priority=priority,
                    negative_prompt=negative_prompt,
                    true_cfg_scale=true_cfg_scale,
                    cache=cache,
                    references=_references(reference, keep_size, image_prompt or [], control, control_type)
                    + [controlnet_reference(text) for text in controlnet_image or []]
                    + _ip_adapter_references(ip_adapter_image, negative_ip_adapter_image),
                ),
                previews=writer,
            )
    except FluxmeshError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None
    unwritable = False
    for path, data in zip(_output_paths(output, len(result.image_data)), result.image_data):
        written = _save(path, data)
        unwritable |= written != path
        typer.echo(str(written))
    if writer is not None and writer.written:
        typer.echo(f"{writer.written} previews in {writer.directory}", err=True)
    if unwritable:
        raise typer.Exit(1)


def _save(path: Path, data: bytes) -> Path:
    """Write an image that was made to `path`, or, where that fails (a folder that cannot be
    made, no permission, a full disk), to a new file in the temp folder: the work is not lost,
    and one line says where it went."""
    import tempfile

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path
    except OSError as error:
        handle, name = tempfile.mkstemp(prefix=f"{path.stem}-", suffix=path.suffix or ".png")
        with open(handle, "wb") as file:
            file.write(data)
        typer.echo(f"error: cannot write {path} ({error.strerror or error}); the image is in {name}", err=True)
        return Path(name)


@app.command()
@with_option_groups
def loras(
    address: Address = "localhost:50050",
    connection: ClientOptions = ClientOptions(),
) -> None:
    """List the LoRAs the server offers (names for --lora)."""
    from fluxmesh.client import Client

    with Client(address, **connection.client_kwargs()) as client:
        for lora in client.list_loras():
            typer.echo(f"{lora.name}\t{lora.size_bytes / 2**20:.1f} MiB{'  (cached)' if lora.cached else ''}")


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
    address: Address = "localhost:50050",
    connection: ClientOptions = ClientOptions(),
) -> None:
    """What each stage holds: model, device, dtype, weight and peak memory."""
    from fluxmesh.client import Client

    with Client(address, **connection.client_kwargs()) as client:
        reply = client.info()
    for stage in reply.stages:
        # Memory and residency are the admin's view (a tenant's Info leaves them out).
        memory = stage.weight_bytes or stage.peak_memory_bytes or stage.residency
        typer.echo(
            f"{stage.stage:9s} {stage.model} on {stage.device} {stage.dtype}"
            + (
                f": weights {stage.weight_bytes / 2**20:.1f} MiB, peak {stage.peak_memory_bytes / 2**20:.1f} MiB"
                if memory
                else ""
            )
            + (f", {stage.residency}" if stage.residency else "")
        )


_CONTROLNET_KEYS = {
    "net": ("controlnet", int),
    "mode": ("controlnet_mode", int),
    "scale": ("scale", float),
    "start": ("control_start", float),
    "end": ("control_end", float),
    "preprocess": ("preprocess", str),
}


def controlnet_reference(text: str) -> Reference:
    """`PATH[:KEY=VALUE,...]` (--controlnet-image) as a CONTROLNET reference."""
    path, _, spec = text.rpartition(":") if "=" in text.rpartition(":")[2] else (text, "", "")
    fields: dict[str, object] = {}
    for item in filter(None, spec.split(",")):
        key, _, value = item.partition("=")
        if key not in _CONTROLNET_KEYS:
            raise typer.BadParameter(
                f"{key!r} in {text!r}; keys: {', '.join(_CONTROLNET_KEYS)}", param_hint="--controlnet-image"
            )
        name, kind = _CONTROLNET_KEYS[key]
        try:
            fields[name] = kind(value)
        except ValueError:
            raise typer.BadParameter(f"{key}={value!r} in {text!r}", param_hint="--controlnet-image") from None
    return Reference(ReferenceRole.controlnet, path, **fields)  # type: ignore[arg-type]


def _references(
    reference: Path | None,
    keep_size: bool,
    image_prompts: list[str],
    control: Path | None,
    control_type: ControlPreprocess,
) -> list[Reference]:
    """The family flags as GenerateOptions' references (the server checks every combination)."""
    references = [Reference(ReferenceRole.kontext, reference, keep_size=keep_size)] if reference else []
    for text in image_prompts:
        path, scale = parse_lora(text)  # the same PATH[:NUMBER] spelling as --lora
        references.append(Reference(ReferenceRole.redux, path, scale=scale))
    if control is not None:
        references.append(Reference(ReferenceRole.control, control, preprocess=control_type))
    return references


def _ip_adapter_references(image: str | None, negative: Path | None) -> list[Reference]:
    """--ip-adapter-image PATH[:SCALE] and --negative-ip-adapter-image PATH as IP_ADAPTER references."""
    references = []
    if image is not None:
        path, scale = parse_lora(image)  # the same PATH[:NUMBER] spelling as --image-prompt
        references.append(Reference(ReferenceRole.ip_adapter, path, scale=scale))
    if negative is not None:
        references.append(Reference(ReferenceRole.ip_adapter, negative, negative=True))
    return references
