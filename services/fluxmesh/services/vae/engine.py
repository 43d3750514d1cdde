"""AutoencoderKL decode of packed FLUX latents, as the tail of FluxPipeline.__call__.

Unpacking and post-processing are diffusers' own (`FluxPipeline._unpack_latents`,
`VaeImageProcessor.postprocess`), so the pixels match the in-process pipeline.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.services.runtime import Placement, module_bytes

log = logging.getLogger(__name__)


class VaeEngine:
    def __init__(self, folder: Path, placement: Placement):
        self.folder = folder
        self.placement = placement
        self.vae = AutoencoderKL.from_pretrained(
            folder, subfolder="vae", torch_dtype=placement.dtype, local_files_only=True
        ).to(placement.device).eval()
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.size_multiple = self.vae_scale_factor * 2
        self.latent_channels = int(self.vae.config.latent_channels)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple)
        log.info("vae: from %s on %s (%.1f MiB)", folder, placement.describe(), self.weight_bytes() / 2**20)

    def weight_bytes(self) -> int:
        return module_bytes(self.vae)

    def check(self, latents: torch.Tensor, width: int, height: int) -> None:
        for field, value in (("width", width), ("height", height)):
            if value <= 0 or value % self.size_multiple:
                raise InvalidArgument(field, f"{value} must be a positive multiple of {self.size_multiple}")
        seq = (height // self.size_multiple) * (width // self.size_multiple)
        expected = (seq, self.latent_channels * 4)
        if tuple(latents.shape[1:]) != expected:
            raise InvalidArgument(
                "latents.shape", f"{list(latents.shape)} does not match {width}x{height}: expected [B, {expected[0]}, {expected[1]}]"
            )

    def decode(self, latents: torch.Tensor, width: int, height: int) -> list[Image.Image]:
        latents = latents.to(self.placement.device, self.placement.dtype)
        latents = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(latents, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pil")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
