"""Exact prompt-embedding cache: the encoder's reply bytes, kept by the orchestrator.

A repeated prompt (a user trying seeds, a product shot at several sizes, a benchmark) is encoded
once: later requests get the very bytes the encoder sent, so their pixels are the same as with
no cache at all, and the encoder call — and in sequential mode the encoder's weight swap — is
skipped.

The key is everything that changes the embedding: the EncodeRequest as sent (prompts, prompts_2,
max_sequence_length, LoRAs with their weights, in order; serialised deterministically) and the
encoder's identity from its Info (`identity`: a fingerprint of its model files, dtype, device
kind, default T5 length and LoRA files; fluxmesh.services.runtime.fingerprint). An encoder
that reports no identity is never cached. The identity is asked again at most every
IDENTITY_SECONDS, so a model or LoRA file replaced under a running encoder is noticed within
that time.

Bounded by bytes, least recently used first out. Concurrent misses of one key share one encoder
call (a burst of the same prompt encodes it once). Hand-written rather than a caching library:
it needs byte sizing, async single-flight and an async key source together, in ~100 lines.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence

from prometheus_client import Counter, Gauge

from fluxmesh.v1 import common_pb2, encoder_pb2

__all__ = ["PromptCache"]

IDENTITY_SECONDS = 1.0
# --prompt-cache-mib: 32 FLUX.1-dev prompts at T5 length 512 in fp32 (8 MiB each), 64 in bf16.
DEFAULT_PROMPT_CACHE_MIB = 256

HITS = Counter("fluxmesh_prompt_cache_hits", "Encoder calls answered by the prompt cache")
MISSES = Counter("fluxmesh_prompt_cache_misses", "Encoder calls the prompt cache could not answer")
BYTES = Gauge("fluxmesh_prompt_cache_bytes", "Bytes of encoder replies held by the prompt cache")
ENTRIES = Gauge("fluxmesh_prompt_cache_entries", "Encoder replies held by the prompt cache")

EncodeMany = Callable[[list[encoder_pb2.EncodeRequest]], Awaitable[Sequence[encoder_pb2.EncodeResponse]]]


class PromptCache:
    def __init__(self, max_bytes: int, info: Callable[[], Awaitable[common_pb2.StageInfo]]):
        """`max_bytes` 0 turns the cache off; `info` asks the encoder for its StageInfo."""
        self.max_bytes = max_bytes
        self._info = info
        self._entries: OrderedDict[bytes, bytes] = OrderedDict()
        self._in_flight: dict[bytes, asyncio.Future] = {}
        self._identity: tuple[float, str] | None = None  # (when asked, identity)
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    async def encode(
        self, requests: list[encoder_pb2.EncodeRequest], encode_many: EncodeMany
    ) -> tuple[list[encoder_pb2.EncodeResponse], int]:
        """Replies to `requests`, from the cache where it can, else from `encode_many` (called at
        most once, with the misses only, never when everything hit). Returns (replies, hits)."""
        if not self.enabled:
            return list(await encode_many(requests)), 0
        identity = await self._encoder_identity()
        if identity is None:
            return list(await encode_many(requests)), 0
        keys = [_key(identity, request) for request in requests]
        replies: list[encoder_pb2.EncodeResponse | None] = [None] * len(requests)
        missing: list[int] = []
        for i, key in enumerate(keys):
            if (reply := await self._lookup(key)) is not None:
                replies[i] = reply
            else:
                missing.append(i)
        hits = len(requests) - len(missing)
        self.hits += hits
        self.misses += len(missing)
        HITS.inc(hits)
        MISSES.inc(len(missing))
        if missing:
            loop = asyncio.get_running_loop()
            leading = {}  # keys this call encodes for everyone asking meanwhile
            for i in missing:
                if keys[i] not in self._in_flight:
                    leading[keys[i]] = self._in_flight[keys[i]] = loop.create_future()
            try:
                fresh = await encode_many([requests[i] for i in missing])
            except BaseException as error:
                for future in leading.values():
                    future.set_exception(error if isinstance(error, Exception) else RuntimeError("cancelled"))
                    future.exception()  # retrieved: waiters fall back to encoding themselves
                raise
            finally:
                for key in leading:
                    self._in_flight.pop(key, None)
            for i, reply in zip(missing, fresh):
                replies[i] = reply
                data = reply.SerializeToString()
                self._store(keys[i], data)
                if keys[i] in leading:
                    leading[keys[i]].set_result(data)
        return replies, hits

    async def _lookup(self, key: bytes) -> encoder_pb2.EncodeResponse | None:
        data = self._entries.get(key)
        if data is None and key in self._in_flight:
            try:  # another request is encoding this very prompt: its reply, not a second call
                data = await asyncio.shield(self._in_flight[key])
            except Exception:  # noqa: BLE001 - its failure is its own: this request encodes itself
                return None
        if data is None:
            return None
        if key in self._entries:
            self._entries.move_to_end(key)
        return encoder_pb2.EncodeResponse.FromString(data)

    def _store(self, key: bytes, data: bytes) -> None:
        if len(data) > self.max_bytes or key in self._entries:
            return
        self._entries[key] = data
        self.bytes += len(data)
        while self.bytes > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= len(evicted)
        BYTES.set(self.bytes)
        ENTRIES.set(len(self._entries))

    async def _encoder_identity(self) -> str | None:
        now = time.monotonic()
        if self._identity is None or now - self._identity[0] > IDENTITY_SECONDS:
            info = await self._info()
            self._identity = (now, info.identity)
        return self._identity[1] or None


def _key(identity: str, request: encoder_pb2.EncodeRequest) -> bytes:
    digest = hashlib.sha256(identity.encode() + b"\0")
    digest.update(request.SerializeToString(deterministic=True))
    return digest.digest()
