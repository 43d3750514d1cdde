"""Vae service: packed latents in, PNG (or raw RGB) images out; images in, latents out (Encode)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

from fluxmesh.contract import Stage
from fluxmesh.rpc.errors import FluxmeshError, InvalidArgument
from fluxmesh.rpc.images import check_mask, open_image
from fluxmesh.services.previews.latent_rgb import LatentRgb, fit_latent_rgb, is_flux_vae
from fluxmesh.services.runtime import model_folder
from fluxmesh.services.runtime.compile import eager
from fluxmesh.services.runtime.servicer import StageServicer, jpeg_pb
from fluxmesh.services.runtime.tensors import from_pb, to_pb
from fluxmesh.services.vae.control import preprocess, require_depth
from fluxmesh.services.vae.encoding import ImageEncoder
from fluxmesh.services.vae.engine import VaeEngine, encode_png
from fluxmesh.services.vae.previews import PreviewLane
from fluxmesh.v1 import common_pb2, vae_pb2, vae_pb2_grpc


class VaeServicer(StageServicer, vae_pb2_grpc.VaeServicer):
    stage = Stage.vae
    engine: VaeEngine

    def __init__(self, engine: VaeEngine, model_name: str):
        super().__init__(engine, model_name)
        self.encoder = ImageEncoder(engine)
        self.previews = PreviewLane(engine, self.worker)
        self.vae_config = model_folder.read_config(engine.folder, "vae")
        # For fast previews, reported by Info: FLUX.1's published map, or one fitted on this VAE.
        self.latent_rgb: LatentRgb | None = LatentRgb.flux() if is_flux_vae(self.vae_config) else None

    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        latents = from_pb(request.latents, "latents", ndim=3)
        self.engine.check(latents, request.width, request.height)
        self.requests += 1
        if request.preview:
            return vae_pb2.DecodeResponse(
                images=jpeg_pb(await self.previews.decode(latents, request.width, request.height))
            )
        raw = request.format == common_pb2.IMAGE_FORMAT_RAW_RGB
        cancelled = threading.Event()  # set when the caller goes away: the decode stops between images
        try:
            images = await self.worker.run(self._decode, latents, request.width, request.height, raw, cancelled)
        finally:
            cancelled.set()
        return vae_pb2.DecodeResponse(images=images)

    def _decode(
        self, latents, width: int, height: int, raw: bool, cancelled: threading.Event | None = None
    ) -> list[common_pb2.Image]:
        # PNG encoding is CPU work too: keep it on the model thread, off the event loop.
        return [
            common_pb2.Image(
                width=image.width,
                height=image.height,
                format=common_pb2.IMAGE_FORMAT_RAW_RGB if raw else common_pb2.IMAGE_FORMAT_PNG,
                data=image.tobytes() if raw else encode_png(image),
            )
            for image in self.engine.decode(latents, width, height, cancelled)
        ]

    async def Encode(self, request: vae_pb2.EncodeImageRequest, context) -> vae_pb2.EncodeImageResponse:
        self.encoder.check(request.width, request.height)
        depth = self.engine.depth.estimate if self.engine.depth is not None else None
        if request.preprocess == common_pb2.CONTROL_PREPROCESS_DEPTH:
            require_depth(depth)  # refused before anything is decoded
        image, mask = await asyncio.to_thread(_open_images, request)  # decoding is CPU work: off the loop
        if request.pixels and mask is not None:
            raise InvalidArgument("mask", "a control image has no mask")
        self.requests += 1
        if request.preprocess == common_pb2.CONTROL_PREPROCESS_DEPTH:  # a model: on the model thread
            image = await self.worker.run(preprocess, image, request.preprocess, depth=depth)
        if request.pixels:  # no weights needed: off the model thread, whatever the residency
            pixels = await asyncio.to_thread(self.encoder.pixels, image, request.width, request.height)
            return vae_pb2.EncodeImageResponse(pixels=to_pb(pixels))
        encoded = await self.worker.run(self.encoder.encode, image, mask, request.width, request.height, request.fill)
        response = vae_pb2.EncodeImageResponse(
            latents=to_pb(encoded.latents),
            posterior=to_pb(encoded.posterior),
            scaling_factor=self.vae_config.get("scaling_factor") or 1.0,
            shift_factor=self.vae_config.get("shift_factor") or 0.0,
        )
        if encoded.mask is not None:
            response.masked_posterior.CopyFrom(to_pb(encoded.masked_posterior))
            response.mask.CopyFrom(to_pb(encoded.mask))
        return response

    async def _latent_rgb(self) -> LatentRgb | None:
        """The latent -> RGB map for fast previews, fitted once while the weights are loaded."""
        if self.latent_rgb is None and self.engine.vae is not None:
            try:
                self.latent_rgb = await self.worker.run(self._fit_latent_rgb)
            except FluxmeshError:  # released meanwhile (sequential mode): the next Info tries again
                pass
        return self.latent_rgb

    def _fit_latent_rgb(self) -> LatentRgb:
        # eager: a compiled decoder would compile a graph for this one-off batch of 16x16 decodes
        with eager(self.engine.compile.enabled):
            return fit_latent_rgb(self.engine.vae)

    async def info_facts(self) -> dict[str, Any]:
        rgb = await self._latent_rgb()
        return {
            "vae_scale_factor": self.engine.vae_scale_factor,
            "size_multiple": self.engine.size_multiple,
            "latent_rgb": rgb.flat() if rgb is not None else [],
            "depth": self.engine.depth is not None,  # CONTROL_PREPROCESS_DEPTH served
        }


def _open_images(request: vae_pb2.EncodeImageRequest):
    image = open_image(request.image, "image")
    mask = open_image(request.mask, "mask") if request.mask else None
    if mask is not None:
        check_mask(mask, image, "mask")
    if request.preprocess and mask is not None:
        raise InvalidArgument("preprocess", "a control image has no mask")
    if request.preprocess == common_pb2.CONTROL_PREPROCESS_DEPTH:
        return image, mask  # the depth model runs on the model thread (Encode)
    return preprocess(image, request.preprocess), mask
