"""What the sync and async clients share: request building and error translation.

The two clients differ only in how they wait; everything else lives here once.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable

import grpc
from PIL import Image

from fluxmesh.contract import PreviewKind
from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.v1 import common_pb2, generator_pb2

Lora = tuple[str, float]
ImageInput = bytes | str | os.PathLike | Image.Image  # PNG/JPEG bytes, a path to one, or a PIL image


def build_request(
    prompt: str,
    *,
    prompt_2: str = "",
    width: int = 0,  # 0: 1024, or the init image's size
    height: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    max_sequence_length: int = 0,
    loras: Iterable[Lora | str] = (),
    init_image: ImageInput | None = None,
    mask_image: ImageInput | None = None,
    strength: float | None = None,
    preview: PreviewKind | str | None = None,
    preview_every: int = 0,
    priority: int = 0,  # higher runs first when requests wait in line
    negative_prompt: str | None = None,  # true CFG (with true_cfg_scale > 1); "" is a valid negative prompt
    negative_prompt_2: str = "",
    true_cfg_scale: float | None = None,
) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        prompt=prompt,
        prompt_2=prompt_2,
        width=width,
        height=height,
        num_images=num_images,
        max_sequence_length=max_sequence_length,
        loras=[_lora_pb(lora) for lora in loras],
        priority=priority,
    )
    if steps is not None:
        request.steps = steps
    if guidance is not None:
        request.guidance = guidance
    if seed is not None:
        request.seed = seed
    if init_image is not None:
        request.init_image = image_bytes(init_image)
    if mask_image is not None:
        request.mask_image = image_bytes(mask_image)
    if strength is not None:
        request.strength = strength
    if negative_prompt is not None:
        request.negative_prompt = negative_prompt
    request.negative_prompt_2 = negative_prompt_2
    if true_cfg_scale is not None:
        request.true_cfg_scale = true_cfg_scale
    if preview is not None:
        request.preview.kind = PreviewKind.parse(str(preview)).pb  # InvalidArgument (a ValueError) naming it
        request.preview.every = preview_every
    return request


def image_bytes(image: ImageInput) -> bytes:
    """PNG/JPEG bytes as they are (the server checks them), a file's bytes, or a PIL image as PNG."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the server sees exactly these pixels
        return buffer.getvalue()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    with open(image, "rb") as file:
        return file.read()


def _lora_pb(lora: Lora | str) -> common_pb2.LoraWeight:
    """`("name", 0.8)`, or a bare `"name"` for weight 1.0."""
    name, weight = (lora, 1.0) if isinstance(lora, str) else lora
    return common_pb2.LoraWeight(name=name, weight=weight)


def parse_lora(text: str) -> Lora:
    """`NAME[:WEIGHT]` as the CLI takes it; the weight defaults to 1.0."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        return text, 1.0  # a name that contains ':' but no weight


def translate(error: grpc.RpcError) -> FluxmeshError:
    """One exception type reaches SDK users: status code + message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return FluxmeshError(details or code.name, code=code)


def metadata(token: str | None) -> Iterable[tuple[str, str]] | None:
    return (("authorization", f"Bearer {token}"),) if token else None
