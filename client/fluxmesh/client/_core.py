"""What the sync and async clients share: request building and error translation.

The two clients differ only in how they wait; everything else lives here once.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc

from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.v1 import generator_pb2

Lora = tuple[str, float]


def build_request(
    prompt: str,
    *,
    prompt_2: str = "",
    width: int = 1024,
    height: int = 1024,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int | None = None,
    num_images: int = 1,
    max_sequence_length: int = 0,
) -> generator_pb2.GenerateRequest:
    request = generator_pb2.GenerateRequest(
        prompt=prompt,
        prompt_2=prompt_2,
        width=width,
        height=height,
        num_images=num_images,
        max_sequence_length=max_sequence_length,
    )
    if steps is not None:
        request.steps = steps
    if guidance is not None:
        request.guidance = guidance
    if seed is not None:
        request.seed = seed
    return request


def translate(error: grpc.RpcError) -> FluxmeshError:
    """One exception type reaches SDK users: status code + message."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = error.details() if hasattr(error, "details") else str(error)
    return FluxmeshError(details or code.name, code=code)


def metadata(token: str | None) -> Iterable[tuple[str, str]] | None:
    return (("authorization", f"Bearer {token}"),) if token else None
