"""Kontext and Control requests: the diffusers pipeline each runs as, and what it is handed.

    Kontext model + reference latents  -> FluxKontextPipeline  (reference tokens join the image
                                                                tokens, ids with first axis 1)
    Control model + control posterior  -> FluxControlPipeline  (control latents concatenated
                                                                along the channels)

As in modes.py the VAE runs in its own service and the pipelines are handed its output: Kontext's
reference as the posterior mode, scaled (the pipeline encodes with sample_mode="argmax" and
skips its own encode and resize when handed latents); Control's image as the posterior, sampled
here with the request's generator *before* the noise, as FluxControlPipeline draws, then packed
(the pipeline skips its encode when handed packed latents). Timesteps, ids, packing, the
sequence slicing and the loop stay diffusers' code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxControlPipeline, FluxKontextPipeline

from fluxmesh.contract import LIMITS
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.denoiser.controlnet import ControlNetImage
from fluxmesh.services.denoiser.modes import Geometry, InitImage, Mode, _sample, _scaled

__all__ = ["Conditioning", "check_conditioning", "choose_family_mode", "is_control_transformer"]


@dataclass(frozen=True)
class Conditioning:
    kontext_latents: torch.Tensor | None = None  # (1, C, h, w): scaled posterior mode of the reference
    control_posterior: torch.Tensor | None = None  # (1, 2C, H/8, W/8): moments of the control image
    controlnets: tuple[ControlNetImage, ...] = ()  # ControlNets' control images (controlnet.py)


def is_control_transformer(in_channels: int, out_channels: int) -> bool:
    """FLUX.1-Canny/Depth: latents + control-image latents along the packed channels (128 = 2 x 64)."""
    return in_channels == 2 * out_channels


def check_conditioning(
    conditioning: Conditioning | None,
    init: InitImage | None,
    *,
    kontext_model: bool,
    control_model: bool,
    width: int,
    height: int,
    latent_channels: int,
    vae_scale_factor: int,
) -> None:
    """Shapes and the model's capabilities; errors name the field."""
    kontext = conditioning.kontext_latents if conditioning is not None else None
    control = conditioning.control_posterior if conditioning is not None else None
    if control_model and control is None:
        raise InvalidArgument(
            "conditioning.control_posterior", "this is a FLUX.1 Canny/Depth model: it needs a control image"
        )
    for field, tensor, capable, what in (
        ("kontext_latents", kontext, kontext_model, "a FLUX.1-Kontext model"),
        ("control_posterior", control, control_model, "a FLUX.1 Canny/Depth model"),
    ):
        if tensor is None:
            continue
        field = f"conditioning.{field}"
        if not capable:
            raise InvalidArgument(field, f"needs {what}; this denoiser's is not one")
        if init is not None and tensor is kontext and not init.has_mask:
            raise InvalidArgument(
                "init.mask", f"an init image with {field} is FluxKontextInpaintPipeline: it needs a mask"
            )
        if not tensor.is_floating_point():
            raise InvalidArgument(f"{field}.dtype", f"{str(tensor.dtype).removeprefix('torch.')} is not a float dtype")
    if kontext is not None:
        shape = tuple(kontext.shape)
        limit = LIMITS.max_side // vae_scale_factor
        if len(shape) != 4 or shape[:2] != (1, latent_channels) or any(s % 2 or not 2 <= s <= limit for s in shape[2:]):
            raise InvalidArgument(
                "conditioning.kontext_latents.shape",
                f"{list(shape)}: expected [1, {latent_channels}, h, w], h and w even in [2, {limit}]",
            )
    if control is not None:
        expected = (1, 2 * latent_channels, height // vae_scale_factor, width // vae_scale_factor)
        if tuple(control.shape) != expected:
            raise InvalidArgument(
                "conditioning.control_posterior.shape",
                f"{list(control.shape)} does not match {width}x{height}: expected {list(expected)}",
            )


class Kontext(Mode):
    name = "kontext"
    pipeline_class = FluxKontextPipeline

    def __init__(self, latents: torch.Tensor):
        super().__init__(None)
        self.latents = latents

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        return {
            "generator": torch.Generator("cpu").manual_seed(seed),
            "image": self.latents.to(geometry.device, geometry.dtype),
            # FluxKontextPipeline rescales width x height to max_area (1024^2 by default), keeping the
            # aspect: with max_area = width x height it keeps the size asked for.
            "max_area": geometry.width * geometry.height,
        }


class Control(Mode):
    name = "control"
    pipeline_class = FluxControlPipeline

    def __init__(self, posterior: torch.Tensor):
        super().__init__(None)
        self.posterior = posterior

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        generator = torch.Generator("cpu").manual_seed(seed)
        # The pipeline encodes the control image repeated once per image and samples that batch
        # in one draw, before the noise: so does this.
        posterior = self.posterior.to(geometry.device, torch.float32).repeat(geometry.batch, 1, 1, 1)
        latents = _scaled(_sample(posterior, generator), pipe.vae.config)
        channels, h, w = latents.shape[1:]
        packed = pipe._pack_latents(latents, geometry.batch, channels, h, w)
        return {"generator": generator, "control_image": packed.to(geometry.dtype)}


def choose_family_mode(conditioning: Conditioning | None) -> Mode | None:
    """Kontext or Control when the request carries their inputs (checked by check_conditioning)."""
    if conditioning is None:
        return None
    if conditioning.kontext_latents is not None:
        return Kontext(conditioning.kontext_latents)
    if conditioning.control_posterior is not None:
        return Control(conditioning.control_posterior)
    return None
