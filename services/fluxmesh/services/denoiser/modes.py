"""Which diffusers pipeline runs a denoise request, and what it is handed.

    no init image                  -> FluxPipeline          (text to image)
    init image                     -> FluxImg2ImgPipeline   (image to image)
    init image + mask              -> FluxInpaintPipeline   (latent blending with the original)
    init image + mask, Fill model  -> FluxFillPipeline      (masked image + mask as extra channels)

The VAE runs in its own service, so the pipelines are handed the image already encoded: each of
them skips its own `vae.encode` when the image's channel count is the latent channel count, and
everything after that (timesteps cut by `strength`, noise, `scale_noise`, the mask packing and
blending, the loop) is diffusers' own code.

What the VAE service sends is the encoder's posterior (the moments AutoencoderKL puts in
`latent_dist`), not a sample: the pipelines sample it with the request's seeded generator, in a
fixed order — init image, then the noise, then (inpainting and Fill) the masked image — so the
sampling has to happen here, where that generator lives. `draw_in_pipeline_order` reproduces
that order draw for draw.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxFillPipeline, FluxImg2ImgPipeline, FluxInpaintPipeline, FluxPipeline
from diffusers.configuration_utils import FrozenDict
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.utils.torch_utils import randn_tensor

from fluxmesh import contract
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.denoiser.previews import X0Scheduler

__all__ = ["Geometry", "InitImage", "Mode", "VaeConfig", "check_init", "choose_mode", "is_fill_transformer"]


@dataclass(frozen=True)
class InitImage:
    """An encoded init image (and mask) for image-to-image, inpainting or Fill."""

    posterior: torch.Tensor  # (1, 2C, h, w): AutoencoderKL encoder moments (mean, logvar) of the init image
    strength: float
    masked_posterior: torch.Tensor | None = None  # (1, 2C, h, w): the same for the masked image
    mask: torch.Tensor | None = None  # (1, 1, H, W) of 0/1: the pipelines' mask_processor output

    @property
    def has_mask(self) -> bool:
        return self.mask is not None


class VaeConfig:
    """A config-only stand-in for the pipelines' `vae`.

    Handed latents, the pipelines still read the VAE's config (latent channels, scaling and
    shift, block count for the scale factor); the weights live in the vae service. A few
    pipelines (FluxControlImg2ImgPipeline, FluxControlInpaintPipeline) take their images only as
    pixels and encode and sample them in their own code, between their other draws: `hand` them
    the posteriors the vae stage computed, and each `encode` answers the next one, so the
    sampling stays the pipeline's, in its order.
    """

    def __init__(self, config: dict[str, Any], dtype: torch.dtype = torch.float32):
        self.config = FrozenDict(config)
        self.dtype = dtype  # FluxControlPipeline casts its (here: already encoded) control image to it
        self._handed: list[torch.Tensor] = []

    def hand(self, *posteriors: torch.Tensor) -> None:
        self._handed.extend(posteriors)

    def encode(self, pixels: torch.Tensor, *args, **kwargs) -> AutoencoderKLOutput:
        if not self._handed:
            raise RuntimeError("the VAE runs in the vae service; the denoiser is handed latents")
        posterior = self._handed.pop(0)
        scale = 2 ** (len(self.config.block_out_channels) - 1)
        if tuple(pixels.shape[-2:]) != tuple(side * scale for side in posterior.shape[-2:]):
            raise RuntimeError(f"asked to encode {list(pixels.shape)}, handed {list(posterior.shape)}")
        # a batch of one image repeated: the posterior repeated, sampled in one draw as the VAE's would be
        posterior = posterior.repeat(pixels.shape[0] // posterior.shape[0], 1, 1, 1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(posterior))

    def decode(self, *args, **kwargs):
        raise RuntimeError("the VAE runs in the vae service; the denoiser is handed latents")


def check_init(
    init: InitImage, *, width: int, height: int, steps: int, latent_channels: int, vae_scale_factor: int
) -> None:
    """Shapes against the request's size, strength against its steps; errors name the field."""
    contract.check_strength(init.strength, "init.strength")
    contract.check_strength_leaves_a_step(init.strength, steps, "init.strength")
    latent = (1, 2 * latent_channels, height // vae_scale_factor, width // vae_scale_factor)
    tensors = [("init.posterior", init.posterior, latent)]
    if (init.mask is None) != (init.masked_posterior is None):
        missing = "init.mask" if init.mask is None else "init.masked_posterior"
        raise InvalidArgument(missing, "inpainting needs both the mask and the masked image's posterior")
    if init.mask is not None:
        tensors += [
            ("init.masked_posterior", init.masked_posterior, latent),
            ("init.mask", init.mask, (1, 1, height, width)),
        ]
    for field, tensor, shape in tensors:
        if tuple(tensor.shape) != shape:
            raise InvalidArgument(
                f"{field}.shape", f"{list(tensor.shape)} does not match {width}x{height}: expected {list(shape)}"
            )
    for field, tensor in (("init.posterior", init.posterior), ("init.masked_posterior", init.masked_posterior)):
        if tensor is not None:
            contract.check_float_dtype(f"{field}.dtype", str(tensor.dtype))
    if init.mask is not None and not bool(((init.mask == 0) | (init.mask == 1)).all()):
        raise InvalidArgument("init.mask.data", "values must be 0 or 1")


def is_fill_transformer(in_channels: int, out_channels: int, vae_scale_factor: int) -> bool:
    """FLUX.1-Fill: latents + masked-image latents + the packed pixel mask (384 = 64 + 64 + 256)."""
    return in_channels == 2 * out_channels + 4 * vae_scale_factor**2


@dataclass(frozen=True)
class Geometry:
    """What the mode needs of the request to prepare the pipeline's inputs."""

    batch: int  # prompts x images: the pipeline's effective batch
    width: int
    height: int
    device: torch.device
    dtype: torch.dtype


class Mode:
    """Text to image: the base case, nothing but the seeded generator."""

    name = "text-to-image"
    pipeline_class: type = FluxPipeline

    def __init__(self, init: InitImage | None = None):
        self.init = init

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        return {"generator": torch.Generator("cpu").manual_seed(seed)}

    def components(self) -> dict[str, Any]:
        """Pipeline components of the mode's own beside the shared ones (a ControlNet)."""
        return {}


class ImageToImage(Mode):
    name = "image-to-image"
    pipeline_class = FluxImg2ImgPipeline

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        generator = torch.Generator("cpu").manual_seed(seed)
        image_latents = _scaled(_sample(self.init.posterior, generator), pipe.vae.config)
        return {"generator": generator, "image": image_latents, "strength": self.init.strength}


class FluxInpaintShowingOriginal(FluxInpaintPipeline):
    """FluxInpaintPipeline that hands a previewing scheduler (X0Scheduler) the packed mask and
    the original's packed latents as the pipeline makes them, so x0 previews show the kept region
    as the final image will. diffusers blends the original into the latents only at each step's
    noise level; the estimate itself would show the model's guess there. __call__ is diffusers'."""

    _original_latents: torch.Tensor | None = None

    def prepare_latents(self, *args, **kwargs):
        latents, noise, original_latents, latent_image_ids = super().prepare_latents(*args, **kwargs)
        self._original_latents = original_latents
        return latents, noise, original_latents, latent_image_ids

    def prepare_mask_latents(self, *args, **kwargs):
        mask, masked_image_latents = super().prepare_mask_latents(*args, **kwargs)
        if isinstance(self.scheduler, X0Scheduler) and self._original_latents is not None:
            self.scheduler.keep_original(mask, self._original_latents)
        return mask, masked_image_latents


class Inpaint(Mode):
    name = "inpainting"
    pipeline_class = FluxInpaintShowingOriginal

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        generator, image, masked = draw_in_pipeline_order(self.init, pipe, seed, geometry)
        return {
            "generator": generator,
            "image": _scaled(image, pipe.vae.config),
            "mask_image": self.init.mask.to(torch.float32),
            # 16 channels: used as the masked-image latents as they are (no scaling applied there).
            "masked_image_latents": _scaled(masked, pipe.vae.config),
            "strength": self.init.strength,
        }


class FluxFillFromLatents(FluxFillPipeline):
    """FluxFillPipeline handed both the init image (as latents) and its packed mask and
    masked-image latents. diffusers accepts one or the other: with `masked_image_latents` alone it
    has no init image to start from at strength < 1, and from `image` alone it would build the
    masked image in pixel space. Only the input check changes; __call__ is diffusers'."""

    def check_inputs(self, *args, **kwargs):
        return super().check_inputs(*args, **{**kwargs, "masked_image_latents": None})


class Fill(Mode):
    name = "fill"
    pipeline_class = FluxFillFromLatents

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        generator, image, masked = draw_in_pipeline_order(self.init, pipe, seed, geometry)
        # The pipeline's own packing of mask and masked-image latents; it applies scaling and
        # shift to the (unscaled) sample itself, as it does after its own vae.encode.
        mask, masked_latents = pipe.prepare_mask_latents(
            self.init.mask.to(torch.float32),
            masked,
            geometry.batch,
            pipe.vae.config.latent_channels,
            1,
            geometry.height,
            geometry.width,
            geometry.dtype,
            geometry.device,
            None,
        )
        return {
            "generator": generator,
            "image": _scaled(image, pipe.vae.config),
            "mask_image": self.init.mask.to(torch.float32),  # checked for, unused once latents are given
            "masked_image_latents": torch.cat((masked_latents, mask), dim=-1),
            "strength": self.init.strength,
        }


def choose_mode(init: InitImage | None, *, fill_transformer: bool) -> Mode:
    """The pipeline for a request; a Fill transformer runs only Fill requests."""
    if fill_transformer:
        if init is None or not init.has_mask:
            field = "init" if init is None else "init.mask"
            raise InvalidArgument(field, "this is a FLUX.1-Fill model: it needs an init image and a mask")
        return Fill(init)
    if init is None:
        return Mode()
    return Inpaint(init) if init.has_mask else ImageToImage(init)


def draw_in_pipeline_order(init: InitImage, pipe, seed: int, geometry: Geometry):
    """Sample init and masked-image posteriors with the seeded generator, exactly as the pipelines
    draw: init image sample, the initial noise (the pipeline draws it itself, from the generator
    returned here), then the masked-image sample. The noise draw is replayed on the way to the
    masked sample and the generator rewound to just before it."""
    generator = torch.Generator("cpu").manual_seed(seed)
    image = _sample(init.posterior, generator)
    before_noise = generator.get_state()
    scale = pipe.vae_scale_factor * 2
    shape = (
        geometry.batch,
        pipe.vae.config.latent_channels,
        2 * (geometry.height // scale),
        2 * (geometry.width // scale),
    )
    randn_tensor(shape, generator=generator, device=geometry.device, dtype=geometry.dtype)
    masked = _sample(init.masked_posterior, generator)
    generator.set_state(before_noise)
    return generator, image, masked


def _sample(posterior: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # retrieve_latents(vae.encode(x), generator) in the pipelines is exactly this.
    return DiagonalGaussianDistribution(posterior).sample(generator)


def _scaled(latents: torch.Tensor, config) -> torch.Tensor:
    return (latents - config.shift_factor) * config.scaling_factor
