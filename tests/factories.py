"""One place that builds what tests need: tiny models, running clusters, reference images."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of a cat sitting on a windowsill"


def reference_images(
    folder: Path,
    *,
    prompt: str = PROMPT,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    num_images: int = 1,
    max_sequence_length: int | None = None,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """What diffusers.FluxPipeline makes of the same folder and inputs: the correctness oracle.
    `pipeline_kwargs` go to the call as they are (e.g. negative_prompt, true_cfg_scale)."""
    import torch

    pipe = _pipeline(str(folder))
    kwargs = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
    if not pipe.transformer.config.guidance_embeds and not max_sequence_length:
        kwargs["max_sequence_length"] = 256  # schnell's default, as the encoder stage uses
    return pipe(
        prompt,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(seed),
        **kwargs,
        **pipeline_kwargs,
    ).images


@cache
def _pipeline(folder: str):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def max_abs_diff(a: Image.Image, b: Image.Image) -> int:
    assert a.size == b.size, (a.size, b.size)
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b.convert(a.mode), dtype=np.int16)).max())


def within_one(got: list[Image.Image], expected: list[Image.Image]) -> bool:
    """The project's oracle: as many images as expected, each within 1/255 of its counterpart."""
    return len(got) == len(expected) and max(max_abs_diff(a, b) for a, b in zip(got, expected)) <= 1


def bare_denoise_request(**fields):
    """A DenoiseRequest with zero text embeddings in the tiny models' widths (8 T5 tokens of 32,
    pooled 32), for tests that drive a denoiser directly, as something other than the
    orchestrator might."""
    import torch

    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.v1 import denoiser_pb2

    return denoiser_pb2.DenoiseRequest(
        prompt_embeds=to_pb(torch.zeros(1, 8, 32)), pooled_prompt_embeds=to_pb(torch.zeros(1, 32)), **fields
    )


def png_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def init_and_mask(width: int = 112, height: int = 80, seed: int = 0) -> tuple[Image.Image, Image.Image]:
    """A seeded RGB init image (smooth colour gradients plus noise) and a mask with a white
    (repaint) rectangle in its middle, both width x height."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    smooth = np.stack([x / width, y / height, (x + y) / (width + height)], -1) * 200
    pixels = (smooth + rng.integers(0, 55, (height, width, 3))).astype(np.uint8)
    mask = np.zeros((height, width), np.uint8)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 255
    return Image.fromarray(pixels, "RGB"), Image.fromarray(mask, "L")


def edit_reference_images(
    folder: Path,
    *,
    init: Image.Image,
    mask: Image.Image | None = None,
    strength: float,
    width: int,
    height: int,
    steps: int,
    guidance: float,
    seed: int,
    num_images: int = 1,
    prompt: str = PROMPT,
    **pipeline_kwargs,
) -> list[Image.Image]:
    """What diffusers' FluxImg2ImgPipeline (no mask), FluxInpaintPipeline (mask) or, for a Fill
    model folder, FluxFillPipeline makes of the same inputs: the oracle for image editing."""
    import torch

    pipe = _edit_pipeline(str(folder), mask is not None)
    extra = {"mask_image": mask} if mask is not None else {}
    if not pipe.transformer.config.guidance_embeds:
        extra["max_sequence_length"] = 256  # schnell's default, as the encoder stage uses
    return pipe(
        prompt,
        image=init,
        strength=strength,
        width=width,
        height=height,
        num_inference_steps=steps,
        guidance_scale=guidance,
        num_images_per_prompt=num_images,
        generator=torch.Generator("cpu").manual_seed(seed),
        **extra,
        **pipeline_kwargs,
    ).images


@cache
def _edit_pipeline(folder: str, masked: bool):
    import json

    from diffusers import FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline

    fill = json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == "FluxFillPipeline"
    cls = FluxFillPipeline if fill else FluxInpaintPipeline if masked else FluxImg2ImgPipeline
    pipe = cls.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pearson(a: Image.Image, b: Image.Image) -> float:
    """Correlation of two same-size images' pixel values (all channels)."""
    x = np.asarray(a.convert("RGB"), dtype=np.float64).ravel()
    y = np.asarray(b.convert("RGB"), dtype=np.float64).ravel()
    return float(np.corrcoef(x, y)[0, 1])
