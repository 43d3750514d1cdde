"""One place that builds what tests need: tiny models, running clusters, reference images."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

PROMPT = "a photo of a cat sitting on a windowsill"


def reference_images(folder: Path, *, prompt: str = PROMPT, width: int, height: int, steps: int, guidance: float,
                     seed: int, num_images: int = 1, max_sequence_length: int | None = None) -> list[Image.Image]:
    """What diffusers.FluxPipeline makes of the same folder and inputs: the correctness oracle."""
    import torch

    pipe = _pipeline(str(folder))
    kwargs = {"max_sequence_length": max_sequence_length} if max_sequence_length else {}
    if not pipe.transformer.config.guidance_embeds and not max_sequence_length:
        kwargs["max_sequence_length"] = 256  # schnell's default, as the encoder stage uses
    return pipe(
        prompt, width=width, height=height, num_inference_steps=steps, guidance_scale=guidance,
        num_images_per_prompt=num_images, generator=torch.Generator("cpu").manual_seed(seed), **kwargs,
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


def png_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
