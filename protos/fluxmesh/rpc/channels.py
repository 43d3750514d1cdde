"""Channel and server options shared by every fluxmesh process.

The biggest tensor hop is the T5 embedding: 512x4096 is 4 MiB in bf16 and 8 MiB in fp32 per
prompt, over gRPC's 4 MiB default. Limits are raised on both ends (servers and channels) to
cover `num_images`-sized batches with room.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import grpc

MAX_MESSAGE_BYTES = 512 * 1024 * 1024

MESSAGE_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]

CHANNEL_OPTIONS = MESSAGE_OPTIONS + [
    # Fail fast and reconnect quickly when a stage restarts.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.enable_retries", 1),
]


def _options(extra: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    """CHANNEL_OPTIONS with `extra` replacing options of the same name (gRPC does not promise which
    of two duplicates wins)."""
    return list(dict([*CHANNEL_OPTIONS, *extra]).items())


def aio_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.aio.Channel:
    """An asyncio channel with fluxmesh's message limits (secure when credentials are given)."""
    all_options = _options(options)
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, options=all_options, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=all_options, interceptors=interceptors)


def sync_channel(
    address: str,
    *,
    credentials: grpc.ChannelCredentials | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A blocking channel with fluxmesh's message limits (secure when credentials are given)."""
    all_options = _options(options)
    if credentials is not None:
        return grpc.secure_channel(address, credentials, options=all_options)
    return grpc.insecure_channel(address, options=all_options)
