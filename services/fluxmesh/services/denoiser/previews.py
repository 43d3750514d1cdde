"""Live previews from inside the denoising loop.

* `X0Scheduler` keeps flow matching's estimate of the clean latents at every step,
  x0 = x_t - sigma_t * v (v: the transformer's velocity), without changing the step itself.
* `fast_previews` projects x0 to RGB with a linear map (`LatentRgb`) straight from the packed
  latents and encodes a small JPEG per image: no VAE, well under a millisecond at 1024x1024.

Previews leave here as `Jpeg`s; the servicer puts them in protobuf.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from fluxmesh import contract
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.previews.jpeg import Jpeg, encode_jpeg
from fluxmesh.services.previews.latent_rgb import LatentRgb


class X0Scheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler that also keeps the x0 estimate of the step it just took."""

    x0: torch.Tensor | None = None
    # Inpainting: (packed mask, packed original latents). The final image keeps the original
    # where the mask is 0, so the estimate shown in previews does too.
    kept: tuple[torch.Tensor, torch.Tensor] | None = None

    def keep_original(self, mask: torch.Tensor, original: torch.Tensor) -> None:
        self.kept = (mask, original)

    def step(self, model_output, timestep, sample, *args, **kwargs):
        if self.step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self.step_index]
        x0 = sample.to(torch.float32) - sigma * model_output
        if self.kept is not None:
            mask, original = self.kept
            x0 = (1 - mask) * original + mask * x0
        self.x0 = x0
        return super().step(model_output, timestep, sample, *args, **kwargs)


def project_packed(packed: torch.Tensor, height: int, width: int, vae_scale_factor: int, rgb: LatentRgb) -> np.ndarray:
    """Packed latents (B, h/2 * w/2, 4C) -> uint8 RGB (B, h, w, 3), h = height / vae_scale_factor.

    One matrix product straight on the packed latents (torch's, which keeps to the process's
    thread setting; numpy's BLAS would start its own thread pool, slow under load), then one
    small copy to put each patch's pixels in place."""
    batch = packed.shape[0]
    h, w = 2 * (height // (vae_scale_factor * 2)), 2 * (width // (vae_scale_factor * 2))
    weight, bias = rgb.patch_map
    tokens = packed.detach().to("cpu", torch.float32).reshape(-1, weight.shape[0])
    image = torch.addmm(bias, tokens, weight).clamp_(0, 255).round_().to(torch.uint8).numpy()
    return image.reshape(batch, h // 2, w // 2, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(batch, h, w, 3)


def fast_previews(x0: torch.Tensor, height: int, width: int, vae_scale_factor: int, rgb: LatentRgb) -> list[Jpeg]:
    """One JPEG per batch entry of the packed x0."""
    return [encode_jpeg(array) for array in project_packed(x0, height, width, vae_scale_factor, rgb)]


@dataclass(frozen=True)
class PreviewSpec:
    """What a request asked for: a preview every `every` steps, fast (RGB JPEGs made here) and/or
    x0 (the estimate itself, for the vae stage to decode)."""

    every: int
    fast: bool = False
    x0: bool = False
    latent_rgb: tuple[float, ...] = ()  # empty: FLUX.1's published map

    def due(self, step: int) -> bool:
        return self.every > 0 and (self.fast or self.x0) and step % self.every == 0

    def check(self, latent_channels: int) -> None:
        contract.check_preview_every(self.every)
        if self.latent_rgb:
            try:
                LatentRgb.from_flat(self.latent_rgb, latent_channels)
            except ValueError as error:
                raise InvalidArgument("preview.latent_rgb", str(error)) from None

    def rgb(self, latent_channels: int) -> LatentRgb:
        return LatentRgb.from_flat(self.latent_rgb, latent_channels) if self.latent_rgb else LatentRgb.flux()


@dataclass(frozen=True)
class StepPreview:
    """What one preview step sends: fast previews, and/or the x0 estimate (packed, on CPU)."""

    images: list[Jpeg]
    x0: torch.Tensor | None


class Previewer:
    """Makes a request's previews at the steps it asked for, from the scheduler's x0."""

    def __init__(self, spec: PreviewSpec, width: int, height: int, vae_scale_factor: int, latent_channels: int):
        self.spec, self.width, self.height, self.vae_scale_factor = spec, width, height, vae_scale_factor
        self.latent_rgb = spec.rgb(latent_channels) if spec.fast else None

    def at(self, step: int, scheduler: X0Scheduler) -> StepPreview | None:
        if not self.spec.due(step) or scheduler.x0 is None:
            return None
        x0 = scheduler.x0
        images = []
        if self.spec.fast:
            images = fast_previews(x0, self.height, self.width, self.vae_scale_factor, self.latent_rgb)
        return StepPreview(images, x0.detach().to("cpu") if self.spec.x0 else None)
