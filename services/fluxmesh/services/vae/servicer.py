"""Vae service: packed latents in, PNG (or raw RGB) images out."""

from __future__ import annotations

from fluxmesh.services.info import stage_info
from fluxmesh.services.tensors import from_pb
from fluxmesh.services.vae.engine import VaeEngine, encode_png
from fluxmesh.services.worker import ModelWorker
from fluxmesh.v1 import common_pb2, vae_pb2, vae_pb2_grpc


class VaeServicer(vae_pb2_grpc.VaeServicer):
    def __init__(self, engine: VaeEngine, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.requests = 0  # accepted requests, reported by Info
        self.worker = ModelWorker("vae")

    async def Decode(self, request: vae_pb2.DecodeRequest, context) -> vae_pb2.DecodeResponse:
        latents = from_pb(request.latents, "latents", ndim=3)
        self.engine.check(latents, request.width, request.height)
        self.requests += 1
        raw = request.format == common_pb2.IMAGE_FORMAT_RAW_RGB
        images = await self.worker.run(self._decode, latents, request.width, request.height, raw)
        return vae_pb2.DecodeResponse(images=images)

    def _decode(self, latents, width: int, height: int, raw: bool) -> list[common_pb2.Image]:
        # PNG encoding is CPU work too: keep it on the model thread, off the event loop.
        return [
            common_pb2.Image(
                width=image.width,
                height=image.height,
                format=common_pb2.IMAGE_FORMAT_RAW_RGB if raw else common_pb2.IMAGE_FORMAT_PNG,
                data=image.tobytes() if raw else encode_png(image),
            )
            for image in self.engine.decode(latents, width, height)
        ]

    async def Info(self, request, context) -> common_pb2.StageInfo:
        return stage_info(
            "vae",
            self.model_name,
            self.engine.placement,
            self.engine.weight_bytes(),
            vae_scale_factor=self.engine.vae_scale_factor,
            size_multiple=self.engine.size_multiple,
            requests=self.requests,
        )
