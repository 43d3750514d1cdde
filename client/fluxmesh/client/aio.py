"""asyncio client: `async with AsyncClient(address) as c: await c.generate(prompt, ...)`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

import grpc

from fluxmesh.client import _core
from fluxmesh.client.events import Event, EventDecoder, GeneratorInfo, LoraInfo, Result, info_from_pb, loras_from_pb
from fluxmesh.client.options import GenerateOptions, takes_generate_options
from fluxmesh.rpc.channels import aio_channel
from fluxmesh.v1 import common_pb2, generator_pb2_grpc


class AsyncGenerationStream:
    """An async iterator of events for one request; `cancel()` stops the generation."""

    def __init__(self, call: Any):
        self._call = call

    async def __aiter__(self) -> AsyncIterator[Event]:
        decoder = EventDecoder()
        try:
            async for message in self._call:
                event = decoder.decode(message)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class AsyncClient:
    """The asyncio twin of `Client`: the same arguments, awaited."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        timeout: float | None = None,
        allow_plaintext_token: bool = False,
    ):
        self._metadata = _core.connection(address, token, credentials, timeout, allow_plaintext_token)
        self.address = address
        self.timeout = timeout
        self._channel = aio_channel(address, credentials=credentials)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    @takes_generate_options
    def stream(self, options: GenerateOptions) -> AsyncGenerationStream:
        """Start a generation and return its events as they happen (ends with a `Result`)."""
        return self._stream(options)

    def _stream(self, options: GenerateOptions) -> AsyncGenerationStream:
        call = self._stub.Generate(
            options.to_request(), timeout=options.timeout or self.timeout, metadata=self._metadata
        )
        return AsyncGenerationStream(call)

    @takes_generate_options
    async def generate(self, options: GenerateOptions) -> Result:
        """Generate and return the result (PIL images, seed, per-stage timings)."""
        result = None
        # To the end of the stream, not just the Result: leaving early cancels a finishing call.
        async for event in self._stream(options):
            if isinstance(event, Result):
                result = event
        if result is None:
            raise _core.no_result()
        return result

    async def info(self, timeout: float | None = 10.0) -> GeneratorInfo:
        """What the orchestrator's stages hold (model, device, dtype, memory) and the model's facts."""
        _core.check_timeout(timeout)
        try:
            reply = await self._stub.Info(common_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return info_from_pb(reply)

    async def list_loras(self, timeout: float | None = 10.0) -> list[LoraInfo]:
        """The LoRAs the server offers, by the names requests use."""
        _core.check_timeout(timeout)
        try:
            reply = await self._stub.ListLoras(common_pb2.ListLorasRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return loras_from_pb(reply)
