"""Kontext and Control with an init image (and mask): the edit pipelines of the family.

    Kontext model + reference + init image + mask -> FluxKontextInpaintPipeline
    Control model + control image + init image     -> FluxControlImg2ImgPipeline
    Control model + control image + init + mask    -> FluxControlInpaintPipeline

The vae stage encodes every image; the pipelines' `__call__` runs as diffusers wrote it. The
two Control pipelines take their images only as pixels and encode and sample them between their
own draws (masked image, control image, init image, then the noise), so they get zero pixels of
the right size and a `vae` handed the posteriors in that order (modes.VaeConfig.hand): each
sample is drawn by the pipeline's code from the request's generator, where diffusers draws it.
FluxKontextInpaintPipeline encodes its images with the posterior mode (no draw) and drops a
reference handed as latents, so its `prepare_latents` is handed both latents instead.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxControlImg2ImgPipeline, FluxControlInpaintPipeline, FluxKontextInpaintPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from fluxmesh.services.denoiser.family import Conditioning
from fluxmesh.services.denoiser.modes import Geometry, InitImage, Mode, _scaled

__all__ = ["choose_family_edit"]


def _pixels(geometry: Geometry) -> torch.Tensor:
    """What stands for an image the vae stage already encoded: the pipelines read only its size."""
    return torch.zeros(1, 3, geometry.height, geometry.width)


class FluxKontextInpaintFromLatents(FluxKontextInpaintPipeline):
    """FluxKontextInpaintPipeline handed its init image's and its reference's latents (scaled
    posterior modes, as its `_encode_vae_image` makes them with sample_mode="argmax"). Only
    `prepare_latents` changes; __call__ is diffusers'."""

    handed: tuple[torch.Tensor, torch.Tensor]

    def prepare_latents(self, image, timestep, batch_size, num_channels_latents, height, width, dtype, device,
                        generator=None, latents=None, image_reference=None):  # fmt: skip
        init, reference = self.handed
        return super().prepare_latents(
            init,
            timestep,
            batch_size,
            num_channels_latents,
            height,
            width,
            dtype,
            device,
            generator,
            latents,
            reference,
        )


class KontextInpaint(Mode):
    name = "kontext-inpainting"
    pipeline_class = FluxKontextInpaintFromLatents

    def __init__(self, reference: torch.Tensor, init: InitImage):
        super().__init__(init)
        self.reference = reference

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        init = _scaled(DiagonalGaussianDistribution(self.init.posterior).mode(), pipe.vae.config)
        pipe.handed = (init.to(geometry.device, geometry.dtype), self.reference.to(geometry.device, geometry.dtype))
        # __call__ encodes the masked image and keeps only the mask (`mask, _ = ...`); its draw
        # comes after the noise's and nothing draws after it.
        pipe.vae.hand(self.init.masked_posterior)
        return {
            "generator": torch.Generator("cpu").manual_seed(seed),
            "image": _pixels(geometry),
            "mask_image": self.init.mask.to(torch.float32),
            "strength": self.init.strength,
            # the output is the init image's size, which the orchestrator snapped already
            "_auto_resize": False,
            "max_area": geometry.width * geometry.height,
        }


class ControlImageToImage(Mode):
    name = "control-image-to-image"
    pipeline_class = FluxControlImg2ImgPipeline

    def __init__(self, control: torch.Tensor, init: InitImage):
        super().__init__(init)
        self.control = control

    def _posteriors(self) -> tuple[torch.Tensor, ...]:
        return self.control, self.init.posterior  # the control image is encoded first, then the init image

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        pipe.vae.hand(*(p.to(geometry.device, torch.float32) for p in self._posteriors()))
        inputs = {
            "generator": torch.Generator("cpu").manual_seed(seed),
            "image": _pixels(geometry),
            "control_image": _pixels(geometry),
            "strength": self.init.strength,
        }
        if self.init.has_mask:
            inputs["mask_image"] = self.init.mask.to(torch.float32)
        return inputs


class ControlInpaint(ControlImageToImage):
    name = "control-inpainting"
    pipeline_class = FluxControlInpaintPipeline

    def _posteriors(self) -> tuple[torch.Tensor, ...]:
        # prepare_mask_latents encodes (and samples) the masked image before anything else
        return self.init.masked_posterior, self.control, self.init.posterior


def choose_family_edit(conditioning: Conditioning | None, init: InitImage | None) -> Mode | None:
    """Kontext or Control with an init image (checked by family.check_conditioning)."""
    if conditioning is None or init is None:
        return None
    if conditioning.kontext_latents is not None:
        return KontextInpaint(conditioning.kontext_latents, init)
    if conditioning.control_posterior is not None:
        return (ControlInpaint if init.has_mask else ControlImageToImage)(conditioning.control_posterior, init)
    return None
