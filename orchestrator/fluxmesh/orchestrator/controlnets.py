"""CONTROLNET references: checked against the denoiser's ControlNets, encoded by the vae stage.

Each CONTROLNET reference names one of the denoiser's ControlNets (`controlnet`, in its
--controlnet order, as its Info lists them) with its own image, union mode, scale and span; the
request then runs FluxControlNetPipeline (several: FluxMultiControlNetModel, in reference
order). What the loaded ControlNets cannot do is FAILED_PRECONDITION naming the field; values
out of range are INVALID_ARGUMENT. The vae stage encodes each image at the output size: the
posterior for latent-input ControlNets (InstantX, the Unions), the preprocessed pixels for XLabs'.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.v1 import common_pb2, denoiser_pb2, generator_pb2, vae_pb2

__all__ = ["ControlNetFacts", "ControlNetReference", "check_controlnet", "encode_controlnets"]


@dataclass(frozen=True)
class ControlNetFacts:
    """One of the denoiser's ControlNets, from its Info."""

    name: str
    union_modes: int  # 0: not a union model
    pixels: bool  # XLabs: takes pixels, not latents

    @classmethod
    def from_pb(cls, info: common_pb2.ControlNetInfo) -> ControlNetFacts:
        return cls(info.name, info.union_modes, info.pixels)


@dataclass(frozen=True)
class ControlNetReference:
    image: bytes
    preprocess: int  # common_pb2.ControlPreprocess
    controlnet: int
    pixels: bool
    union: bool
    mode: int
    scale: float
    start: float
    end: float


def check_controlnet(
    reference: generator_pb2.Reference, field: str, loaded: Sequence[ControlNetFacts], limits: Limits = LIMITS
) -> ControlNetReference:
    """One CONTROLNET reference against the ControlNets the denoiser holds."""
    if not loaded:
        raise FailedPrecondition(
            f"{field}.role: REFERENCE_ROLE_CONTROLNET needs a ControlNet; none is loaded "
            "(the denoiser was started without --controlnet)"
        )
    index = reference.controlnet
    if index < 0:
        raise InvalidArgument(f"{field}.controlnet", f"{index} must be >= 0")
    if index >= len(loaded):
        names = ", ".join(f"{i}: {net.name}" for i, net in enumerate(loaded))
        raise FailedPrecondition(f"{field}.controlnet: {index}, but the denoiser holds {len(loaded)} ({names})")
    net = loaded[index]
    mode = reference.controlnet_mode
    if mode < 0:
        raise InvalidArgument(f"{field}.controlnet_mode", f"{mode} must be >= 0")
    if net.union_modes == 0 and mode:
        raise FailedPrecondition(
            f"{field}.controlnet_mode: {mode}, but ControlNet {index} ({net.name}) is not a union model"
        )
    if net.union_modes and mode >= net.union_modes:
        raise FailedPrecondition(
            f"{field}.controlnet_mode: {mode}, but ControlNet {index} ({net.name}) has "
            f"{net.union_modes} union modes (0 to {net.union_modes - 1})"
        )
    scale = reference.scale if reference.HasField("scale") else 1.0
    contract.check_controlnet_scale(f"{field}.scale", scale, limits)
    start = reference.control_start if reference.HasField("control_start") else 0.0
    end = reference.control_end if reference.HasField("control_end") else 1.0
    contract.check_control_span(start, end, f"{field}.control_start", f"{field}.control_end")
    return ControlNetReference(
        reference.image, reference.preprocess, index, net.pixels, bool(net.union_modes), mode, scale, start, end
    )


def check_controlnet_combination(
    controlnets: Sequence[ControlNetReference], *, has_init: bool, images: int, limits: Limits = LIMITS
) -> None:
    if len(controlnets) > limits.max_controlnet_images:
        raise InvalidArgument(
            "references", f"{len(controlnets)} CONTROLNET references; at most {limits.max_controlnet_images}"
        )
    if len({c.pixels for c in controlnets}) > 1:  # diffusers takes the first ControlNet's kind for all
        raise InvalidArgument("references", "XLabs and latent-input (InstantX, Union) ControlNets in one request")
    contract.check_union_controlnet_batch(len(controlnets) == 1 and controlnets[0].union, has_init, images)


async def encode_controlnets(
    vae, controlnets: Sequence[ControlNetReference], *, width: int, height: int, timeout: float | None
) -> list[denoiser_pb2.ControlNetImage]:
    """Each control image at the output size through the vae stage's Encode (the caller holds its turn)."""
    images = []
    for reference in controlnets:
        encoded = await vae.encode_image(
            vae_pb2.EncodeImageRequest(
                image=reference.image,
                width=width,
                height=height,
                preprocess=reference.preprocess,
                pixels=reference.pixels,
            ),
            timeout,
        )
        image = denoiser_pb2.ControlNetImage(
            controlnet=reference.controlnet,
            mode=reference.mode,
            scale=reference.scale,
            start=reference.start,
            end=reference.end,
        )
        # the posterior is sampled in the denoiser, as the pipeline samples its own encode
        (image.pixels if reference.pixels else image.posterior).CopyFrom(
            encoded.pixels if reference.pixels else encoded.posterior
        )
        images.append(image)
    return images
