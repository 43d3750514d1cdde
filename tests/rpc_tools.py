"""Call any fluxmesh RPC with raw bytes or a message, and get back (status code, details).

Hostile-input and fuzz tests need to send what no typed stub would build (corrupt bytes,
invalid UTF-8, unknown enum numbers) and to treat unary and streaming RPCs alike.
"""

from __future__ import annotations

import grpc
from google.protobuf.message import Message

from fluxmesh.rpc.channels import sync_channel

# Full method name -> streams its responses?
STREAMING = {"/fluxmesh.v1.Generator/Generate", "/fluxmesh.v1.Denoiser/Denoise"}


def _identity(data: bytes) -> bytes:
    return data


def call(
    channel: grpc.Channel, method: str, request: Message | bytes, *, timeout: float = 30.0, metadata=None
) -> tuple[grpc.StatusCode, str, list[bytes]]:
    """Send `request` to `method`; return the final status, its details and the raw responses."""
    data = request if isinstance(request, bytes) else request.SerializeToString()
    responses: list[bytes] = []
    try:
        if method in STREAMING:
            stream = channel.unary_stream(method, request_serializer=_identity, response_deserializer=_identity)
            for response in stream(data, timeout=timeout, metadata=metadata):
                responses.append(response)
        else:
            unary = channel.unary_unary(method, request_serializer=_identity, response_deserializer=_identity)
            responses.append(unary(data, timeout=timeout, metadata=metadata))
    except grpc.RpcError as error:
        return error.code(), error.details() or "", responses
    return grpc.StatusCode.OK, "", responses


class Caller:
    """One channel per address, reused for every call of a test module; `metadata` goes with
    every call unless a call names its own (e.g. a Mesh's stage token)."""

    def __init__(self, metadata=None) -> None:
        self._channels: dict[str, grpc.Channel] = {}
        self.metadata = metadata

    def __call__(self, address: str, method: str, request: Message | bytes, **kwargs):
        if address not in self._channels:
            self._channels[address] = sync_channel(address)
        kwargs.setdefault("metadata", self.metadata)
        return call(self._channels[address], method, request, **kwargs)

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
