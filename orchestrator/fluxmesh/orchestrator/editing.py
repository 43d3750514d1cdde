"""The image-editing and preview parts of a GenerateRequest, validated up front.

Image to image, inpainting and Fill: the init image (and mask) are decoded and checked here,
before any stage works — PNG/JPEG, within size limits, the mask one channel and the init
image's size, strength in (0, 1] and leaving at least one step — and sent to the vae stage as
they came. As in the diffusers pipelines the init image is resized to width x height; a request
that leaves width/height at 0 gets the init image's size (scaled down to fit 2048 if larger,
rounded down to the model's size multiple).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits, PreviewKind
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.rpc.images import check_mask, open_image
from fluxmesh.v1 import denoiser_pb2, generator_pb2, vae_pb2

DEFAULT_STRENGTH = 0.6  # FluxImg2ImgPipeline's and FluxInpaintPipeline's default
DEFAULT_FILL_STRENGTH = 1.0  # FluxFillPipeline's default: Fill models repaint from noise


@dataclass(frozen=True)
class EditParams:
    init_image: bytes
    mask_image: bytes  # empty: image to image
    strength: float
    width: int  # the init image's own size, fitted to the model (used when the request gives 0)
    height: int
    fill: bool = False  # a FLUX.1-Fill model: the vae stage makes the masked image as FluxFillPipeline does

    @property
    def inpainting(self) -> bool:
        return bool(self.mask_image)


@dataclass(frozen=True)
class PreviewParams:
    kind: PreviewKind
    every: int


def check_edit(request: generator_pb2.GenerateRequest, init_image: bytes, mask_image: bytes, *,
               fill_model: bool) -> float | None:
    """The cheap part, on the event loop: which fields go together, and the strength. None for
    text to image; errors name the field. The images (read from the request once: each read of
    a bytes field is a copy) are decoded by `decode_edit`."""
    has_strength = request.HasField("strength")
    if not init_image:
        if mask_image:
            raise InvalidArgument("mask_image", "needs an init_image to repaint")
        if has_strength:
            raise InvalidArgument("strength", "applies only with an init_image")
        if fill_model:
            raise InvalidArgument("init_image", "this is a FLUX.1-Fill model: it needs an init_image and a mask_image")
        return None
    if fill_model and not mask_image:
        raise InvalidArgument("mask_image", "this is a FLUX.1-Fill model: it needs a mask_image")
    strength = as_typed(request.strength) if has_strength else DEFAULT_FILL_STRENGTH if fill_model else DEFAULT_STRENGTH
    contract.check_strength(strength)
    return strength


def decode_edit(init_image: bytes, mask_image: bytes, strength: float, *, fill_model: bool, size_multiple: int,
                limits: Limits = LIMITS) -> EditParams:
    """Decode and check the init image and mask: CPU work (a 4096x4096 PNG takes a good part of
    a second), so callers run it off the event loop."""
    init = open_image(init_image, "init_image")
    if mask_image:
        check_mask(open_image(mask_image, "mask_image"), init, "mask_image")
    width, height = contract.fit_size(init.width, init.height, size_multiple, limits)
    return EditParams(init_image, mask_image, strength, width, height, fill_model)


def as_typed(value: float) -> float:
    """The shortest decimal that is the same float32 as `value`: the number the client typed.

    strength is a float32 on the public API, so 0.8 arrives as 0.800000011920929, and the steps
    an img2img pipeline runs are int(steps * strength)-based: 5 * 0.8000000119 runs 5 steps
    where diffusers, given 0.8, runs 4."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        decimal = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", decimal))[0] == value:
            return decimal
    return value


def check_preview(request: generator_pb2.GenerateRequest, limits: Limits = LIMITS) -> PreviewParams | None:
    kind = PreviewKind.from_pb(request.preview.kind)
    contract.check_preview_every(request.preview.every, limits)
    return PreviewParams(kind, request.preview.every or 1) if kind else None


async def encode_init(vae, edit: EditParams | None, *, width: int, height: int,
                      timeout: float | None) -> denoiser_pb2.InitImage | None:
    """The init image (and mask) through the vae stage's Encode, as the denoiser takes it (the
    caller holds the vae's turn)."""
    if edit is None:
        return None
    encoded = await vae.encode_image(
        vae_pb2.EncodeImageRequest(image=edit.init_image, mask=edit.mask_image, width=width, height=height,
                                   fill=edit.fill),
        timeout,
    )
    init = denoiser_pb2.InitImage(posterior=encoded.posterior, strength=edit.strength)
    if edit.inpainting:
        init.masked_posterior.CopyFrom(encoded.masked_posterior)
        init.mask.CopyFrom(encoded.mask)
    return init
