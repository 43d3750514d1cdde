"""ControlNets beside the transformer: FluxControlNetPipeline (several: FluxMultiControlNetModel).

The denoiser holds its ControlNets (`--controlnet FOLDER`, repeatable) as FluxControlNetModel
folders in the layouts their authors publish for diffusers: InstantX and the ControlNet-Unions
(InstantX, Shakker-Labs) take the control image as VAE latents, XLabs' as pixels through an
input_hint_block. They load, move and release with the transformer (one residency: sequential
mode swaps them together).

A request names, per control image, which ControlNet takes it, its union mode, scale and span;
the pipeline's own `__call__` runs with them, so the mode tensors, the per-step keep schedule
(control_guidance_start/end), the residual sums of several ControlNets and the loop are
diffusers' code. The pipeline would vae-encode each InstantX-style image itself, sampling with
the request's generator before the noise; the vae stage has already encoded them, so the
pipeline is handed a shape-only placeholder image at the output size (it takes height and width
from it) and a `vae` whose `encode` answers with the vae stage's posteriors, in the order the
pipeline asks for them, for the pipeline to sample as it would its own.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
)
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.models.controlnets.controlnet_flux import FluxMultiControlNetModel

from fluxmesh import contract
from fluxmesh.contract import LIMITS
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.services.denoiser.modes import Geometry, InitImage, Mode, VaeConfig
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.memory import module_bytes
from fluxmesh.services.runtime.tensors import from_pb
from fluxmesh.v1 import common_pb2, denoiser_pb2

__all__ = ["ControlNetImage", "ControlNets", "controlnet_images_from_pb", "resolve_controlnet"]

log = logging.getLogger(__name__)

# The transformer's config keys a ControlNet has to share: its residuals are added to the
# transformer's hidden states, over the same latent features, text and pooled widths.
_SHARED_CONFIG = (
    "in_channels",
    "num_attention_heads",
    "attention_head_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
)


@dataclass(frozen=True)
class ControlNetImage:
    """One control image as the vae stage encoded it, and how the pipeline applies it."""

    controlnet: int  # which of the denoiser's ControlNets
    posterior: torch.Tensor | None  # (1, 2C, H/8, W/8): latent-input layouts (InstantX, Union)
    pixels: torch.Tensor | None  # (1, 3, H, W) in [-1, 1]: XLabs
    mode: int  # control_mode (union models)
    scale: float  # controlnet_conditioning_scale
    start: float  # control_guidance_start
    end: float  # control_guidance_end


def controlnet_images_from_pb(conditioning: denoiser_pb2.Conditioning) -> tuple[ControlNetImage, ...]:
    if len(conditioning.controlnets) > LIMITS.max_controlnet_images:  # counted before walked
        raise InvalidArgument(
            "conditioning.controlnets",
            f"{len(conditioning.controlnets)} control images; at most {LIMITS.max_controlnet_images}",
        )
    images = []
    for i, image in enumerate(conditioning.controlnets):
        field = f"conditioning.controlnets[{i}]"
        if image.HasField("posterior") == image.HasField("pixels"):
            raise InvalidArgument(field, "needs exactly one of posterior (InstantX, Union) and pixels (XLabs)")
        images.append(
            ControlNetImage(
                controlnet=image.controlnet,
                posterior=from_pb(image.posterior, f"{field}.posterior", ndim=4)
                if image.HasField("posterior")
                else None,
                pixels=from_pb(image.pixels, f"{field}.pixels", ndim=4) if image.HasField("pixels") else None,
                mode=image.mode,
                scale=image.scale,
                start=image.start,
                end=image.end,
            )
        )
    return tuple(images)


def resolve_controlnet(source: str) -> Path:
    """A FluxControlNetModel folder (config.json + safetensors), or a Hub id fetched as one."""
    return model_folder.resolve_folder(
        source,
        what="controlnet",
        marker="config.json",
        expected="a FluxControlNetModel folder",
        example="InstantX/FLUX.1-dev-Controlnet-Canny",
        patterns=["config.json", "*.safetensors", "*.safetensors.index.json"],
    )


@dataclass(frozen=True)
class _Net:
    folder: Path
    union_modes: int  # num_mode; 0: not a union model
    pixels: bool  # XLabs: an input_hint_block on the pixels


class ControlNets:
    """The denoiser's ControlNets, in --controlnet order; weights read by `load` and dropped by
    `drop` with the transformer's. Facts come from the configs, so they hold while released."""

    def __init__(self, folders: Sequence[Path], transformer_config: dict[str, Any]):
        self.nets: list[_Net] = []
        for folder in folders:
            config = FluxControlNetModel.load_config(folder)
            for key in _SHARED_CONFIG:
                if config.get(key) != transformer_config.get(key):
                    raise FailedPrecondition(
                        f"controlnet {folder}: {key} {config.get(key)} != the transformer's {transformer_config.get(key)}"
                    )
            union = int(config.get("num_mode") or 0)
            self.nets.append(_Net(folder, union, config.get("conditioning_embedding_channels") is not None))
        self.modules_: list[FluxControlNetModel] = []

    def __len__(self) -> int:
        return len(self.nets)

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        self.modules_ = [
            FluxControlNetModel.from_pretrained(
                net.folder,
                torch_dtype=dtype,
                local_files_only=True,
                use_safetensors=True,  # never unpickle a .bin
            )
            .to(device)
            .eval()
            for net in self.nets
        ]

    def drop(self) -> None:
        self.modules_ = []

    def modules(self) -> list[torch.nn.Module]:
        return list(self.modules_)

    def weight_bytes(self) -> int:
        return module_bytes(*self.modules_)

    def info(self) -> list[common_pb2.ControlNetInfo]:
        return [
            common_pb2.ControlNetInfo(name=net.folder.name, union_modes=net.union_modes, pixels=net.pixels)
            for net in self.nets
        ]

    def check(
        self,
        images: Sequence[ControlNetImage],
        *,
        init: bool,
        batch: int,
        width: int,
        height: int,
        latent_channels: int,
        vae_scale_factor: int,
    ) -> None:
        """Each image against its ControlNet and the request's size; errors name the field."""
        if len(images) > LIMITS.max_controlnet_images:
            raise InvalidArgument("conditioning.controlnets", f"at most {LIMITS.max_controlnet_images} control images")
        for i, image in enumerate(images):
            field = f"conditioning.controlnets[{i}]"
            if not 0 <= image.controlnet < len(self.nets):
                raise InvalidArgument(
                    f"{field}.controlnet", f"{image.controlnet}: this denoiser holds {len(self.nets)} ControlNet(s)"
                )
            net = self.nets[image.controlnet]
            if net.pixels:
                tensor, name, shape = image.pixels, "pixels", (1, 3, height, width)
            else:
                tensor, name = image.posterior, "posterior"
                shape = (1, 2 * latent_channels, height // vae_scale_factor, width // vae_scale_factor)
            if tensor is None:
                raise InvalidArgument(
                    f"{field}.{name}", f"ControlNet {image.controlnet} ({net.folder.name}) takes {name}"
                )
            if tuple(tensor.shape) != shape:
                raise InvalidArgument(
                    f"{field}.{name}.shape",
                    f"{list(tensor.shape)} does not match {width}x{height}: expected {list(shape)}",
                )
            contract.check_float_dtype(f"{field}.{name}.dtype", str(tensor.dtype))
            if not 0 <= image.mode < max(net.union_modes, 1):
                what = f"its {net.union_modes} union modes" if net.union_modes else "0: it is not a union model"
                raise InvalidArgument(
                    f"{field}.mode", f"{image.mode} is not among ControlNet {image.controlnet}'s ({what})"
                )
            contract.check_controlnet_scale(f"{field}.scale", image.scale)
            contract.check_control_span(image.start, image.end, f"{field}.start", f"{field}.end")
        if len({self.nets[image.controlnet].pixels for image in images}) > 1:
            # diffusers decides latents or pixels by the first ControlNet for all of them
            raise InvalidArgument("conditioning.controlnets", "XLabs and latent-input ControlNets in one request")
        union = len(images) == 1 and bool(self.nets[images[0].controlnet].union_modes)
        contract.check_union_controlnet_batch(union, init, batch)

    def mode(
        self,
        images: Sequence[ControlNetImage],
        init: InitImage | None,
        vae_config: dict[str, Any],
        dtype: torch.dtype,
    ) -> ControlNetRun:
        nets = [(self.modules_[image.controlnet], self.nets[image.controlnet]) for image in images]
        return ControlNetRun(images, nets, init, vae_config, dtype)


class _EncodedByTheVaeStage(VaeConfig):
    """The pipeline's `vae`: `encode` answers each of its calls with the next posterior the vae
    stage computed (repeated to the batch it asks for), for the pipeline to sample itself."""

    def __init__(self, config: dict[str, Any], dtype: torch.dtype, posteriors: Sequence[torch.Tensor]):
        super().__init__(config, dtype)
        self._posteriors = list(posteriors)

    def encode(self, pixels: torch.Tensor, *args, **kwargs) -> AutoencoderKLOutput:
        posterior = self._posteriors.pop(0).to(pixels.device).repeat(pixels.shape[0], 1, 1, 1)
        return AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution(posterior))


class ControlNetRun(Mode):
    """A ControlNet request: FluxControlNetPipeline with one ControlNet, or several as a
    FluxMultiControlNetModel of the ones the images name, in their order; with an init image
    FluxControlNetImg2ImgPipeline, and a mask FluxControlNetInpaintPipeline."""

    name = "controlnet"

    def __init__(
        self,
        images: Sequence[ControlNetImage],
        nets: Sequence[tuple[FluxControlNetModel, _Net]],
        init: InitImage | None,
        vae_config: dict[str, Any],
        dtype: torch.dtype,
    ):
        super().__init__(init)
        self.images, self.nets = list(images), list(nets)
        self.vae_config, self.dtype = vae_config, dtype
        if init is None:
            self.pipeline_class: type = FluxControlNetPipeline
        else:
            self.pipeline_class = FluxControlNetInpaintPipeline if init.has_mask else FluxControlNetImg2ImgPipeline

    def components(self) -> dict[str, Any]:
        modules = [module for module, _ in self.nets]
        # in the order the pipelines encode: the control images, then (img2img, inpainting) the
        # init image before the noise, then (inpainting) the masked image after it
        posteriors = [image.posterior for image in self.images if image.posterior is not None]
        if self.init is not None:
            posteriors += [self.init.posterior] + ([self.init.masked_posterior] if self.init.has_mask else [])
        return {
            "controlnet": modules[0] if len(modules) == 1 else FluxMultiControlNetModel(modules),
            "vae": _EncodedByTheVaeStage(self.vae_config, self.dtype, posteriors),
        }

    def inputs(self, pipe, seed: int, geometry: Geometry) -> dict[str, Any]:
        placeholder = torch.zeros(1, 3, geometry.height, geometry.width)  # only its shape is read
        control_images = [placeholder if image.pixels is None else image.pixels for image in self.images]
        values = {
            "control_image": control_images,
            "control_mode": [
                image.mode if net.union_modes else None for image, (_, net) in zip(self.images, self.nets)
            ],
            "controlnet_conditioning_scale": [image.scale for image in self.images],
            "control_guidance_start": [image.start for image in self.images],
            "control_guidance_end": [image.end for image in self.images],
        }
        if len(self.images) == 1:  # a single FluxControlNetModel takes plain values
            values = {key: value[0] for key, value in values.items()}
        if self.init is not None:
            values |= {"image": placeholder, "strength": self.init.strength}
            if self.init.has_mask:
                values["mask_image"] = self.init.mask.to(torch.float32)
        return {"generator": torch.Generator("cpu").manual_seed(seed), **values}
