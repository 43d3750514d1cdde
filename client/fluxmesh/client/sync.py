"""Blocking client: `Client(address).generate(prompt, ...)`."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from fluxmesh.client import _core
from fluxmesh.client.events import Event, LoraInfo, Result, event_from_pb, loras_from_pb
from fluxmesh.rpc.channels import sync_channel
from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.v1 import generator_pb2, generator_pb2_grpc, common_pb2


class GenerationStream:
    """An iterator of events for one request; `cancel()` stops the generation server-side."""

    def __init__(self, call):
        self._call = call

    def __iter__(self) -> Iterator[Event]:
        try:
            for message in self._call:
                yield event_from_pb(message)
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Talks to a fluxmesh orchestrator. Use as a context manager or call `close()`."""

    def __init__(self, address: str, *, token: str | None = None, credentials: grpc.ChannelCredentials | None = None,
                 timeout: float | None = None):
        self.address = address
        self.timeout = timeout
        self._metadata = _core.metadata(token)
        self._channel = sync_channel(address, credentials=credentials)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def stream(self, prompt: str, *, timeout: float | None = None, **options) -> GenerationStream:
        """Start a generation and return its events as they happen (ends with a `Result`)."""
        request = _core.build_request(prompt, **options)
        call = self._stub.Generate(request, timeout=timeout or self.timeout, metadata=self._metadata)
        return GenerationStream(call)

    def generate(self, prompt: str, **options) -> Result:
        """Generate and return the result (PIL images, seed, per-stage timings)."""
        result = None
        # Read to the end of the stream, not just to the Result: leaving early would cancel a call
        # that is about to finish (the server sees CANCELLED instead of OK).
        for event in self.stream(prompt, **options):
            if isinstance(event, Result):
                result = event
        if result is None:
            raise FluxmeshError("the stream ended without a result", code=grpc.StatusCode.INTERNAL)
        return result

    def info(self, timeout: float | None = 10.0) -> generator_pb2.GeneratorInfo:
        try:
            return self._stub.Info(common_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    def list_loras(self, timeout: float | None = 10.0) -> list[LoraInfo]:
        """The LoRAs the server offers, by the names requests use."""
        try:
            reply = self._stub.ListLoras(common_pb2.ListLorasRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return loras_from_pb(reply)
