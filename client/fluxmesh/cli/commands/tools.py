"""Offline tools: tiny-model, quantize, plan (no server involved)."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fluxmesh.cli.shared_options import CostLimits, T5Gguf, TransformerGguf, with_option_groups
from fluxmesh.services.gguf.types import Component, Naming, QuantType
from fluxmesh.services.tools.tiny_model import ModelSize, Variant

app = typer.Typer()


@app.command("tiny-model")
def tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder to write.")],
    schnell: Annotated[bool, typer.Option(help="FLUX.1-schnell style: no guidance embedding.")] = False,
    size: Annotated[
        ModelSize, typer.Option(help="tiny (tests) or small (about 1 s per generation, benchmarks).")
    ] = ModelSize.tiny,
    seed: Annotated[int, typer.Option()] = 0,
    variant: Annotated[
        Variant,
        typer.Option(
            help="base (FLUX.1-dev/schnell), fill, kontext, control (Canny/Depth), redux (a FLUX.1-Redux folder "
            "for `serve encoder --redux`, matching this --size), control-lora (a Canny Control LoRA file for "
            "`serve denoiser --control-lora` on this --size's base model), controlnet, controlnet-union, "
            "controlnet-xlabs (a ControlNet folder for `serve denoiser --controlnet`, this --size and --schnell), "
            "ip-adapter (XLabs' ip_adapter.safetensors for `serve denoiser --ip-adapter` + image_encoder/ for "
            "`serve encoder --ip-adapter-image-encoder`) or depth (a Depth Anything model for "
            "`serve vae --depth-model`)."
        ),
    ] = Variant.base,
) -> None:
    """Write a tiny random-weight FLUX model in the exact diffusers folder layout (offline)."""
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    typer.echo(str(write_tiny_model(directory, schnell=schnell, size=size, seed=seed, variant=variant)))


@app.command()
def quantize(
    source: Annotated[Path, typer.Argument(help="Model folder, its transformer/ folder, or a BFL .safetensors file.")],
    output: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    type: Annotated[QuantType, typer.Option("--type", "-t", help="Quantization type.")] = QuantType.Q8_0,
    naming: Annotated[Naming, typer.Option(help="Tensor names: bfl (as community files) or diffusers.")] = Naming.bfl,
    component: Annotated[
        Component, typer.Option(help="transformer, or t5 (the text_encoder_2 of a model folder).")
    ] = Component.transformer,
    force: Annotated[
        bool, typer.Option("--force", help="Replace OUTPUT if it exists (never one of the source's files).")
    ] = False,
) -> None:
    """Write a GGUF file in the community (city96) layout, loadable by fluxmesh, ComfyUI-GGUF and diffusers."""
    from fluxmesh.rpc.errors import FluxmeshError
    from fluxmesh.services.gguf import quantize_cli

    try:
        typer.echo(str(quantize_cli(source, output, type.value, naming.value, component.value, force=force)))
    except FluxmeshError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None


class PlanDtype(str, Enum):
    """The dtypes the planner can size weights in (planning's bytes-per-value table)."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
@with_option_groups
def plan(
    model: Annotated[Path, typer.Option(help="Local diffusers-layout model folder (only file headers are read).")],
    vram: Annotated[str, typer.Option(help="Memory of one accelerator, e.g. 16GiB, 24GB, 12.5G.")] = "16GiB",
    width: Annotated[int, typer.Option()] = 1024,
    height: Annotated[int, typer.Option()] = 1024,
    num_images: Annotated[int, typer.Option(help="Images per request (the denoiser and VAE batch).")] = 1,
    dtype: Annotated[
        PlanDtype, typer.Option(help="Dtype the stages load weights in (compute dtype for GGUF).")
    ] = PlanDtype.bfloat16,
    transformer_gguf: TransformerGguf = None,
    t5_gguf: T5Gguf = None,
    max_sequence_length: Annotated[int | None, typer.Option(help="T5 length (default: 512 dev, 256 schnell).")] = None,
    context_overhead: Annotated[
        str, typer.Option(help="CUDA context per stage process, outside torch's allocator.")
    ] = "0.5GiB",
    redux: Annotated[Path | None, typer.Option(help="A FLUX.1-Redux folder the encoder loads too (--redux).")] = None,
    controlnet: Annotated[
        list[Path] | None, typer.Option(help="A ControlNet folder the denoiser holds too (--controlnet; repeatable).")
    ] = None,
    ip_adapter: Annotated[
        Path | None, typer.Option(help="An XLabs IP-Adapter file the denoiser loads too (--ip-adapter).")
    ] = None,
    ip_adapter_image_encoder: Annotated[
        Path | None,
        typer.Option(help="The CLIP vision folder the encoder loads too (--ip-adapter-image-encoder)."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Denoising steps (default: the orchestrator's, 28 dev, 4 schnell); with the size, the request's work."
        ),
    ] = None,
    true_cfg: Annotated[bool, typer.Option(help="The request uses true CFG (twice the work).")] = False,
    request_limits: CostLimits = CostLimits(),
) -> None:
    """Each stage's weights (from the files) and activations (from the resolution), and which
    placements fit an accelerator of --vram: all resident, sequential, encoder on CPU, one per
    stage, or which transformer quantization is needed; and whether an orchestrator with the same
    limit flags admits such a request (the same check it makes)."""
    import json

    from fluxmesh.rpc.errors import FluxmeshError
    from fluxmesh.services.tools.planning import make_plan, parse_size

    try:
        result = make_plan(
            model,
            vram=parse_size(vram),
            width=width,
            height=height,
            num_images=num_images,
            dtype=dtype.value,
            transformer_gguf=transformer_gguf,
            t5_gguf=t5_gguf,
            max_sequence_length=max_sequence_length,
            context_bytes=parse_size(context_overhead, "context_overhead"),
            redux=redux,
            controlnets=controlnet or [],
            ip_adapter=ip_adapter,
            ip_adapter_image_encoder=ip_adapter_image_encoder,
            steps=steps,
            true_cfg=true_cfg,
            limits=request_limits.limits(),
        )
    except FluxmeshError as error:
        typer.echo(f"error: {error.message}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps(result.to_dict(), indent=2) if as_json else result.describe())
