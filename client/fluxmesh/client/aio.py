"""asyncio client: `async with AsyncClient(address) as c: await c.generate(prompt, ...)`."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from fluxmesh.client import _core
from fluxmesh.client.events import Event, LoraInfo, Result, event_from_pb, loras_from_pb
from fluxmesh.rpc.channels import aio_channel
from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.v1 import generator_pb2, generator_pb2_grpc, common_pb2


class AsyncGenerationStream:
    """An async iterator of events for one request; `cancel()` stops the generation."""

    def __init__(self, call):
        self._call = call

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            async for message in self._call:
                yield event_from_pb(message)
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    def __init__(self, address: str, *, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = _core.metadata(token)
        self._channel = aio_channel(address, credentials=credentials)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    def stream(self, prompt: str, *, timeout: float | None = None, **options) -> AsyncGenerationStream:
        request = _core.build_request(prompt, **options)
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return AsyncGenerationStream(call)

    async def generate(self, prompt: str, **options) -> Result:
        result = None
        # To the end of the stream, not just the Result: leaving early cancels a finishing call.
        async for event in self.stream(prompt, **options):
            if isinstance(event, Result):
                result = event
        if result is None:
            raise FluxmeshError("the stream ended without a result", code=grpc.StatusCode.INTERNAL)
        return result

    async def info(self, timeout: float | None = 10.0) -> generator_pb2.GeneratorInfo:
        try:
            return await self._stub.Info(common_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    async def list_loras(self, timeout: float | None = 10.0) -> list[LoraInfo]:
        """The LoRAs the server offers, by the names requests use."""
        try:
            reply = await self._stub.ListLoras(common_pb2.ListLorasRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return loras_from_pb(reply)
