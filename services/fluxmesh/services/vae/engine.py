"""AutoencoderKL decode of packed FLUX latents, as the tail of FluxPipeline.__call__.

Unpacking and post-processing are diffusers' own (`FluxPipeline._unpack_latents`,
`VaeImageProcessor.postprocess`), so the pixels match the in-process pipeline.
"""

from __future__ import annotations

import io
import logging
import threading
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxPipeline
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Stage
from fluxmesh.rpc.errors import Cancelled, InvalidArgument
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.compile import CompileOptions, CompileWatch, check_warmup_size, compile_module
from fluxmesh.services.runtime.device import Device
from fluxmesh.services.runtime.memory import module_bytes
from fluxmesh.services.vae.depth import DepthEstimator

log = logging.getLogger(__name__)


class VaeEngine:
    def __init__(
        self,
        folder: Path,
        device: Device,
        *,
        depth_model: Path | None = None,
        compile: CompileOptions = CompileOptions(),
        load: bool = True,
    ):
        """`load=False` leaves the weights unread: the stage's `Residency` loads them when told.
        `depth_model`: a transformers depth model for CONTROL_PREPROCESS_DEPTH, held with the VAE.
        `compile`: torch.compile each decoder loaded, warmed up by `warm_up` (compile.py)."""
        self.folder = folder
        self.device = device
        self.vae: AutoencoderKL | None = None
        self.depth = DepthEstimator(depth_model, device.dtype) if depth_model is not None else None
        self.compile = compile
        self.compile_watch = CompileWatch(Stage.vae) if compile.enabled else None
        # Facts from the config, not the module: they hold while the weights are released.
        config = model_folder.read_config(folder, "vae")
        self.vae_scale_factor = 2 ** (len(config["block_out_channels"]) - 1)
        self.size_multiple = self.vae_scale_factor * 2
        self.latent_channels = int(config["latent_channels"])
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.size_multiple)
        for width, height in compile.warmup_sizes if compile.enabled else ():
            check_warmup_size(width, height, self.size_multiple)
        log.info("vae: from %s for %s", folder, device.describe())
        if load:
            self.load_weights(device.torch_device)

    def load_weights(self, device: torch.device) -> None:
        """Read the VAE from the model files onto `device` (CPU for an offloaded start)."""
        self.vae = (
            AutoencoderKL.from_pretrained(
                self.folder,
                subfolder="vae",
                torch_dtype=self.device.dtype,
                local_files_only=True,
                use_safetensors=True,  # never unpickle a .bin
            )
            .to(device)
            .eval()
        )
        if self.depth is not None:
            self.depth.load(device)
        if self.compile.enabled:
            compile_module(self.vae.decoder)  # decode only: encoding (img2img) stays eager

    def warm_up(self) -> None:
        """Compile the decoder now, for each --warmup-sizes size (one image at a time, as
        `decode` runs it), before the stage reports SERVING (compile.py)."""
        if self.compile_watch is None:
            return
        with self.compile_watch.warming_up():
            if self.vae is None:
                return
            for width, height in self.compile.warmup_sizes:
                shape = (1, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
                self.vae.decode(torch.zeros(shape, device=self.device.torch_device, dtype=self.device.dtype))

    def drop_weights(self) -> None:
        self.vae = None
        if self.depth is not None:
            self.depth.drop()

    def weight_modules(self) -> list[torch.nn.Module]:
        depth = [self.depth.model] if self.depth is not None and self.depth.model is not None else []
        return ([self.vae] if self.vae is not None else []) + depth

    def weight_bytes(self) -> int:
        return module_bytes(*self.weight_modules())

    def check(self, latents: torch.Tensor, width: int, height: int) -> None:
        # A hostile size must not allocate a host: the contract's bounds, as the denoiser's.
        contract.check_size(width, height, self.size_multiple)
        contract.check_float_dtype("latents.dtype", str(latents.dtype))
        if not 1 <= latents.shape[0] <= LIMITS.max_images:
            raise InvalidArgument("latents.shape", f"batch of {latents.shape[0]} is outside [1, {LIMITS.max_images}]")
        seq = (height // self.size_multiple) * (width // self.size_multiple)
        expected = (seq, self.latent_channels * 4)
        if tuple(latents.shape[1:]) != expected:
            raise InvalidArgument(
                "latents.shape",
                f"{list(latents.shape)} does not match {width}x{height}: expected [B, {expected[0]}, {expected[1]}]",
            )

    def decode(
        self, latents: torch.Tensor, width: int, height: int, cancelled: threading.Event | None = None
    ) -> list[Image.Image]:
        """FluxPipeline's decode, one image at a time: a cancelled request stops between images
        (`Cancelled`), and activation memory is one image's, not the batch's. Each sample goes
        through the VAE on its own in a batch too (no layer mixes samples), so the pixels are
        FluxPipeline's (tests/test_limits.py). One image's decode is not interruptible; its
        size is bounded by the contract's max_side and work budget."""
        latents = latents.to(self.device.torch_device, self.device.dtype)
        latents = FluxPipeline._unpack_latents(latents, height, width, self.vae_scale_factor)
        latents = latents / self.vae.config.scaling_factor + self.vae.config.shift_factor
        images: list[Image.Image] = []
        for i in range(latents.shape[0]):
            if cancelled is not None and cancelled.is_set():
                raise Cancelled(f"cancelled after {i} of {latents.shape[0]} images were decoded")
            image = self.vae.decode(latents[i : i + 1], return_dict=False)[0]
            images += self.image_processor.postprocess(image, output_type="pil")
        return images


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
