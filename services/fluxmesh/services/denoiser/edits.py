"""A DenoiseRequest's init image and preview options, from protobuf to the engine's types."""

from __future__ import annotations

from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.denoiser.controlnet import controlnet_images_from_pb
from fluxmesh.services.denoiser.family import Conditioning
from fluxmesh.services.denoiser.modes import InitImage
from fluxmesh.services.denoiser.previews import PreviewSpec
from fluxmesh.services.runtime.tensors import from_pb
from fluxmesh.v1 import denoiser_pb2


def init_from_pb(request: denoiser_pb2.DenoiseRequest) -> InitImage | None:
    if not request.HasField("init"):
        return None
    init = request.init
    for field in ("posterior", "mask", "masked_posterior"):
        needed = field == "posterior" or init.HasField("mask") or init.HasField("masked_posterior")
        if needed and not init.HasField(field):
            raise InvalidArgument(f"init.{field}", "is missing")
    masked = init.HasField("mask")
    return InitImage(
        posterior=from_pb(init.posterior, "init.posterior", ndim=4),
        strength=init.strength,
        masked_posterior=from_pb(init.masked_posterior, "init.masked_posterior", ndim=4) if masked else None,
        mask=from_pb(init.mask, "init.mask", ndim=4) if masked else None,  # 0/1 checked by check_init
    )


def preview_from_pb(request: denoiser_pb2.DenoiseRequest) -> PreviewSpec | None:
    if not request.HasField("preview"):
        return None
    preview = request.preview
    return PreviewSpec(every=preview.every, fast=preview.fast, x0=preview.x0, latent_rgb=tuple(preview.latent_rgb))


def conditioning_from_pb(request: denoiser_pb2.DenoiseRequest) -> Conditioning | None:
    if not request.HasField("conditioning"):
        return None
    conditioning = request.conditioning
    tensors = {
        field: from_pb(getattr(conditioning, field), f"conditioning.{field}", ndim=4)
        for field in ("kontext_latents", "control_posterior")
        if conditioning.HasField(field)
    }
    if len(tensors) > 1:
        raise InvalidArgument("conditioning", "kontext_latents and control_posterior are for different models")
    return Conditioning(**tensors, controlnets=controlnet_images_from_pb(conditioning))
