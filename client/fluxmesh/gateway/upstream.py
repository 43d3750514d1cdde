"""The orchestrator, reached with fluxmesh's own asyncio SDK, as each HTTP caller's own token.

The SDK binds a bearer token to a client (its channel), and callers of the gateway present their
own tokens, which the orchestrator checks. So there is one SDK client per token presented, kept
in a small LRU. Only idle clients are evicted (closing a channel would cancel its calls), so
while every client is busy the pool grows past its bound until one is idle again.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import grpc

from fluxmesh.client import AsyncClient


@dataclass
class _Entry:
    client: AsyncClient
    users: int = 0


class Upstream:
    def __init__(
        self,
        address: str,
        *,
        credentials: grpc.ChannelCredentials | None = None,
        allow_plaintext_token: bool = False,
        max_clients: int = 16,
    ):
        self.address = address
        self._credentials = credentials
        self._allow_plaintext_token = allow_plaintext_token
        self._max = max_clients
        self._entries: OrderedDict[str | None, _Entry] = OrderedDict()
        self._closing: set[asyncio.Task] = set()

    @asynccontextmanager
    async def client(self, token: str | None) -> AsyncIterator[AsyncClient]:
        entry = self._entries.get(token)
        if entry is None:
            entry = self._entries[token] = _Entry(
                AsyncClient(
                    self.address,
                    token=token,
                    credentials=self._credentials,
                    allow_plaintext_token=self._allow_plaintext_token,
                )
            )
            self._evict()
        self._entries.move_to_end(token)
        entry.users += 1
        try:
            yield entry.client
        finally:
            entry.users -= 1

    def _evict(self) -> None:
        for token in [t for t, e in self._entries.items() if not e.users][: max(0, len(self._entries) - self._max)]:
            task = asyncio.ensure_future(self._entries.pop(token).client.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for entry in self._entries.values():
            await entry.client.close()
        self._entries.clear()
