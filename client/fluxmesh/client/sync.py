"""Blocking client: `Client(address).generate(prompt, ...)`."""

from __future__ import annotations

from collections.abc import Iterator
from types import TracebackType
from typing import Any

import grpc

from fluxmesh.client import _core
from fluxmesh.client.events import Event, EventDecoder, GeneratorInfo, LoraInfo, Result, info_from_pb, loras_from_pb
from fluxmesh.client.options import GenerateOptions, takes_generate_options
from fluxmesh.rpc.channels import sync_channel
from fluxmesh.v1 import common_pb2, generator_pb2_grpc


class GenerationStream:
    """An iterator of events for one request; `cancel()` stops the generation server-side."""

    def __init__(self, call: Any):
        self._call = call

    def __iter__(self) -> Iterator[Event]:
        decoder = EventDecoder()
        try:
            for message in self._call:
                event = decoder.decode(message)
                if event is not None:
                    yield event
        except grpc.RpcError as error:
            raise _core.translate(error) from None

    def cancel(self) -> None:
        self._call.cancel()


class Client:
    """Talks to a fluxmesh orchestrator. Use as a context manager or call `close()`.

    `token` is sent as a bearer token; `credentials` (e.g. `grpc.ssl_channel_credentials(...)`)
    enable TLS; `timeout` is the deadline in seconds of every generation that names none.
    """

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
        self._channel = sync_channel(address, credentials=credentials)
        self._stub = generator_pb2_grpc.GeneratorStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    @takes_generate_options
    def stream(self, options: GenerateOptions) -> GenerationStream:
        """Start a generation and return its events as they happen (ends with a `Result`)."""
        return self._stream(options)

    def _stream(self, options: GenerateOptions) -> GenerationStream:
        call = self._stub.Generate(
            options.to_request(), timeout=options.timeout or self.timeout, metadata=self._metadata
        )
        return GenerationStream(call)

    @takes_generate_options
    def generate(self, options: GenerateOptions) -> Result:
        """Generate and return the result (PIL images, seed, per-stage timings)."""
        result = None
        # Read to the end of the stream, not just to the Result: leaving early would cancel a call
        # that is about to finish (the server sees CANCELLED instead of OK).
        for event in self._stream(options):
            if isinstance(event, Result):
                result = event
        if result is None:
            raise _core.no_result()
        return result

    def info(self, timeout: float | None = 10.0) -> GeneratorInfo:
        """What the orchestrator's stages hold (model, device, dtype, memory) and the model's facts."""
        _core.check_timeout(timeout)
        try:
            reply = self._stub.Info(common_pb2.InfoRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return info_from_pb(reply)

    def list_loras(self, timeout: float | None = 10.0) -> list[LoraInfo]:
        """The LoRAs the server offers, by the names requests use."""
        _core.check_timeout(timeout)
        try:
            reply = self._stub.ListLoras(common_pb2.ListLorasRequest(), timeout=timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise _core.translate(error) from None
        return loras_from_pb(reply)
