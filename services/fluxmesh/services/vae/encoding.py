"""Image (and mask) -> the AutoencoderKL posterior, prepared exactly as the FLUX edit pipelines do.

FluxImg2ImgPipeline / FluxInpaintPipeline / FluxFillPipeline preprocess with a VaeImageProcessor
(resize to height x width, [-1, 1]) and a mask processor (grayscale, binarized), build the
masked image from those, and encode with `vae.encode(...).latent_dist`. The processors here are
built with the pipelines' own settings, so the tensors the encoder sees are the pipelines'.

What goes back is the posterior's parameters (mean and log-variance), not a sample: the
pipelines sample them with the request's seeded generator, interleaved with the noise draw, so
the denoiser (which owns that generator) samples. `latents` (the posterior mode, scaled and
shifted into the transformer's space) is returned too, for callers that want plain latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fluxmesh import contract


@dataclass(frozen=True)
class EncodedImage:
    latents: torch.Tensor  # (1, C, h, w): (mode - shift) * scaling
    posterior: torch.Tensor  # (1, 2C, h, w)
    masked_posterior: torch.Tensor | None  # (1, 2C, h, w) when a mask was given
    mask: torch.Tensor | None  # (1, 1, H, W) uint8 0/1


def processors(size_multiple: int, latent_channels: int) -> tuple[VaeImageProcessor, VaeImageProcessor]:
    """The image and mask processors as the FLUX edit pipelines build them in __init__."""
    image = VaeImageProcessor(vae_scale_factor=size_multiple, vae_latent_channels=latent_channels)
    mask = VaeImageProcessor(
        vae_scale_factor=size_multiple,
        vae_latent_channels=latent_channels,
        do_normalize=False,
        do_binarize=True,
        do_convert_grayscale=True,
    )
    return image, mask


def init_image_rgb(image: Image.Image) -> Image.Image:
    # The pipelines expect RGB (diffusers.utils.load_image converts so); RGBA/L/P would give the
    # VAE the wrong channel count.
    return image if image.mode == "RGB" else image.convert("RGB")


def masked_image(init: torch.Tensor, mask: torch.Tensor, fill: bool) -> torch.Tensor:
    """The image the pipelines encode for the masked region, each with its own formula."""
    if fill:
        return init * (1 - mask)  # FluxFillPipeline
    return init * (mask < 0.5)  # FluxInpaintPipeline


class ImageEncoder:
    """Encodes init images (and masks) with a VaeEngine's AutoencoderKL (read at call time: the
    stage may release and reload its weights between requests)."""

    def __init__(self, engine):
        self.engine = engine
        self.image_processor, self.mask_processor = processors(engine.size_multiple, engine.latent_channels)

    def check(self, width: int, height: int) -> None:
        contract.check_size(width, height, self.engine.size_multiple)

    def pixels(self, image: Image.Image, width: int, height: int) -> torch.Tensor:
        """(1, 3, H, W) in [-1, 1]: the image as the pipelines preprocess it before encoding (what
        an XLabs ControlNet's input_hint_block takes in place of latents)."""
        return self.image_processor.preprocess(init_image_rgb(image), height=height, width=width).to(torch.float32)

    def encode(
        self, image: Image.Image, mask: Image.Image | None, width: int, height: int, fill: bool = False
    ) -> EncodedImage:
        pixels = self.pixels(image, width, height)
        posterior = self._posterior(pixels)
        config = self.engine.vae.config
        latents = (posterior.mode() - config.shift_factor) * config.scaling_factor
        if mask is None:
            return EncodedImage(latents, posterior.parameters, None, None)
        mask_pixels = self.mask_processor.preprocess(mask, height=height, width=width)
        masked = self._posterior(masked_image(pixels, mask_pixels, fill))
        return EncodedImage(latents, posterior.parameters, masked.parameters, mask_pixels.to(torch.uint8))

    def _posterior(self, pixels: torch.Tensor):
        device = self.engine.device
        return self.engine.vae.encode(pixels.to(device.torch_device, device.dtype)).latent_dist
