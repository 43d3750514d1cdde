"""A linear map from VAE latents to RGB: what fast previews are made with.

For FLUX.1's VAE the map is the published one. Any other VAE (the tiny random-weight test
models, other 16-channel VAEs) gets one fitted by least squares on its own decoder: decode
seeded N(0, 1) latents, average-pool the images to latent resolution, regress. The vae service
owns the VAE, so it makes the map and reports it in Info; the denoiser applies it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np

# FLUX.1 VAE latents (in the transformer's scaled/shifted space) -> RGB in [-1, 1], one row per
# latent channel, as published in ComfyUI's comfy/latent_formats.py (class Flux:
# latent_rgb_factors, latent_rgb_factors_bias).
FLUX_LATENT_RGB_FACTORS = (
    (-0.0346, 0.0244, 0.0681),
    (0.0034, 0.0210, 0.0687),
    (0.0275, -0.0668, -0.0433),
    (-0.0174, 0.0160, 0.0617),
    (0.0859, 0.0721, 0.0329),
    (0.0004, 0.0383, 0.0115),
    (0.0405, 0.0861, 0.0915),
    (-0.0236, -0.0185, -0.0259),
    (-0.0245, 0.0250, 0.1180),
    (0.1008, 0.0755, -0.0421),
    (-0.0515, 0.0201, 0.0011),
    (0.0428, -0.0012, -0.0036),
    (0.0817, 0.0765, 0.0749),
    (-0.1264, -0.0522, -0.1103),
    (-0.0280, -0.0881, -0.0499),
    (-0.1262, -0.0982, -0.0778),
)
FLUX_LATENT_RGB_BIAS = (-0.0329, -0.0718, -0.0851)

# FLUX.1's VAE, as its config.json describes it: the published map applies to exactly this one.
FLUX_VAE = {
    "latent_channels": 16,
    "block_out_channels": [128, 256, 512, 512],
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
}


@dataclass(frozen=True)
class LatentRgb:
    """A linear latent -> RGB map: rgb = latents @ factors + bias, in [-1, 1]."""

    factors: np.ndarray  # (C, 3)
    bias: np.ndarray  # (3,)

    @classmethod
    def flux(cls) -> LatentRgb:
        return cls(np.array(FLUX_LATENT_RGB_FACTORS, np.float32), np.array(FLUX_LATENT_RGB_BIAS, np.float32))

    @classmethod
    def from_flat(cls, values, channels: int) -> LatentRgb:
        """`channels * 3` factors (row-major) then 3 bias values, as DenoiseRequest carries them."""
        flat = np.asarray(list(values), np.float32)
        if flat.shape != (channels * 3 + 3,) or not np.isfinite(flat).all():
            raise ValueError(f"expected {channels * 3 + 3} finite values, got {flat.size}")
        return cls(flat[: channels * 3].reshape(channels, 3), flat[channels * 3 :])

    @cached_property
    def patch_map(self):
        """The map for packed tokens, as float32 CPU torch tensors (weight 4C x 12, bias 12).

        Each packed token holds a 2x2 patch of C-channel latents in (c, dy, dx) order, so the
        C x 3 map becomes a block-diagonal 4C x 12 one (RGB of each of the 4 pixels), with the
        [-1, 1] -> [0, 255] scaling folded in."""
        import torch

        channels = self.factors.shape[0]
        weight = np.zeros((channels, 4, 4, 3), np.float32)
        for k in range(4):
            weight[:, k, k, :] = self.factors
        weight = weight.reshape(channels * 4, 12) * 127.5
        bias = np.tile((self.bias + 1) * 127.5, 4).astype(np.float32)
        return torch.from_numpy(weight), torch.from_numpy(bias)

    def flat(self) -> list[float]:
        return [float(v) for v in self.factors.reshape(-1)] + [float(v) for v in self.bias]


def is_flux_vae(config) -> bool:
    return all(_same(config.get(key), value) for key, value in FLUX_VAE.items())


def _same(a, b) -> bool:
    if isinstance(b, list):
        return list(a or []) == b
    return a is not None and abs(float(a) - b) < 1e-6


def fit_latent_rgb(vae, *, samples: int = 4, side: int = 16, seed: int = 0) -> LatentRgb:
    """Least-squares latent -> RGB map for `vae`'s decoder (an AutoencoderKL): decode seeded
    N(0, 1) latents of the transformer's space, average-pool each image to latent resolution and
    regress pixels on latents (plus a bias)."""
    import torch

    config = vae.config
    channels = int(config.latent_channels)
    param = next(vae.parameters())
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = torch.randn(samples, channels, side, side, generator=generator)
    with torch.inference_mode():
        scaled = latents.to(param.device, param.dtype) / config.scaling_factor + (config.shift_factor or 0.0)
        images = vae.decode(scaled, return_dict=False)[0].float().cpu()
    pooled = torch.nn.functional.avg_pool2d(images, images.shape[-1] // side)  # (samples, 3, side, side)
    x = torch.cat([latents.permute(0, 2, 3, 1).reshape(-1, channels), torch.ones(samples * side * side, 1)], 1)
    y = pooled.permute(0, 2, 3, 1).reshape(-1, 3)
    solution = torch.linalg.lstsq(x.double(), y.double()).solution.float().numpy()
    return LatentRgb(solution[:channels], solution[channels])
