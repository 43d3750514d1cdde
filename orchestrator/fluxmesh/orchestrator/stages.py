"""Clients for the three stage services, with errors translated for the public API.

Python gRPC does not carry deadlines or cancellation to outgoing calls by itself: every call
here takes the time left on the incoming call, and the streaming call is cancelled explicitly
when the caller goes away.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import contextmanager

import grpc

from fluxmesh.rpc.channels import aio_channel
from fluxmesh.rpc.errors import FluxmeshError, StageUnavailable
from fluxmesh.v1 import (
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    common_pb2,
    vae_pb2,
    vae_pb2_grpc,
)

@contextmanager
def stage_errors(stage: str, address: str):
    """Re-raise a stage's failure as a fluxmesh error that names the stage."""
    try:
        yield
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.UNAVAILABLE:
            raise StageUnavailable(stage, f"{address}: {error.details()}") from None
        raise FluxmeshError(f"{stage} stage: {error.details()}", code=error.code()) from None


class StageClient:
    stage = ""

    def __init__(self, address: str, *, credentials: grpc.ChannelCredentials | None = None):
        self.address = address
        self.channel = aio_channel(address, credentials=credentials)

    async def info(self, timeout: float | None = 5.0) -> common_pb2.StageInfo:
        with stage_errors(self.stage, self.address):
            return await self._stub.Info(common_pb2.InfoRequest(), timeout=timeout)

    async def close(self) -> None:
        await self.channel.close()


class EncoderClient(StageClient):
    stage = "encoder"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self._stub = encoder_pb2_grpc.TextEncoderStub(self.channel)

    async def encode(self, request: encoder_pb2.EncodeRequest, timeout: float | None) -> encoder_pb2.EncodeResponse:
        with stage_errors(self.stage, self.address):
            return await self._stub.Encode(request, timeout=timeout)


class DenoiserClient(StageClient):
    stage = "denoiser"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self._stub = denoiser_pb2_grpc.DenoiserStub(self.channel)

    async def denoise(
        self, request: denoiser_pb2.DenoiseRequest, timeout: float | None
    ) -> AsyncIterator[denoiser_pb2.DenoiseEvent]:
        call = self._stub.Denoise(request, timeout=timeout)
        try:
            with stage_errors(self.stage, self.address):
                async for event in call:
                    yield event
        finally:
            call.cancel()  # no-op when finished; stops the denoiser when our caller left

    async def list_loras(self, timeout: float | None) -> common_pb2.ListLorasResponse:
        with stage_errors(self.stage, self.address):
            return await self._stub.ListLoras(common_pb2.ListLorasRequest(), timeout=timeout)


class VaeClient(StageClient):
    stage = "vae"

    def __init__(self, address: str, **kwargs):
        super().__init__(address, **kwargs)
        self._stub = vae_pb2_grpc.VaeStub(self.channel)

    async def decode(self, request: vae_pb2.DecodeRequest, timeout: float | None) -> vae_pb2.DecodeResponse:
        with stage_errors(self.stage, self.address):
            return await self._stub.Decode(request, timeout=timeout)
