"""Where `response_format=url` images wait to be fetched: bounded in bytes, expiring.

An id is 128 random bits (the URL is the capability, as OpenAI's signed blob URLs are). The
oldest images go first when the store is full; an image larger than the whole store is refused.
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class Stored:
    data: bytes
    media_type: str
    expires: float


class ResultStore:
    def __init__(self, *, max_bytes: int = 256 * 2**20, ttl: float = 600.0, clock=time.monotonic):
        self.max_bytes, self.ttl, self._clock = max_bytes, ttl, clock
        self._items: OrderedDict[str, Stored] = OrderedDict()  # oldest first
        self._held = 0

    @property
    def held_bytes(self) -> int:
        return self._held

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: bytes, media_type: str) -> str:
        if len(data) > self.max_bytes:
            raise ValueError(f"an image of {len(data)} bytes exceeds the result store ({self.max_bytes} bytes)")
        self._expire()
        while self._held + len(data) > self.max_bytes:
            self._drop(next(iter(self._items)))
        key = secrets.token_urlsafe(16)
        self._items[key] = Stored(data, media_type, self._clock() + self.ttl)
        self._held += len(data)
        return key

    def get(self, key: str) -> Stored | None:
        self._expire()
        return self._items.get(key)

    def _expire(self) -> None:
        now = self._clock()
        while self._items and next(iter(self._items.values())).expires <= now:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        self._held -= len(self._items.pop(key).data)
