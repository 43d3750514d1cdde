"""The orchestrator's exact prompt-embedding cache: what it keys by, its byte bound, its LRU,
one encoder call for a burst of one prompt, and end to end: a repeat skips the encoder and
keeps the diffusers pixels."""

from __future__ import annotations

import asyncio
import os
import time

import pytest

from factories import max_abs_diff, reference_images
from fluxmesh.client import Client
from fluxmesh.orchestrator.prompt_cache import BYTES, HITS, MISSES, PromptCache
from fluxmesh.v1 import common_pb2, encoder_pb2


class FakeEncoder:
    """Replies whose bytes say which request made them; counts the calls and their requests."""

    def __init__(self, identity: str = "model-a", size: int = 1000, delay: float = 0.0):
        self.identity, self.size, self.delay = identity, size, delay
        self.calls: list[list[encoder_pb2.EncodeRequest]] = []
        self.fail = False

    async def info(self) -> common_pb2.StageInfo:
        return common_pb2.StageInfo(stage="encoder", identity=self.identity)

    async def encode_many(self, requests):
        self.calls.append(list(requests))
        await asyncio.sleep(self.delay)
        if self.fail:
            raise RuntimeError("encoder down")
        return [
            encoder_pb2.EncodeResponse(
                prompt_embeds=common_pb2.Tensor(
                    dtype="float32", shape=[1], data=r.SerializeToString().ljust(self.size)
                ),
                truncated_tokens=[len(self.calls)],
            )
            for r in requests
        ]


def _request(prompt="a cat", **fields) -> encoder_pb2.EncodeRequest:
    loras = fields.pop("loras", [])
    return encoder_pb2.EncodeRequest(
        prompts=[prompt], loras=[common_pb2.LoraWeight(name=n, weight=w) for n, w in loras], **fields
    )


def _run(coro):
    return asyncio.run(coro)


def test_a_repeat_is_answered_with_the_encoders_own_bytes_and_no_call():
    encoder = FakeEncoder()
    cache = PromptCache(1 << 20, encoder.info)

    async def scenario():
        first, hits_first = await cache.encode([_request()], encoder.encode_many)
        again, hits_again = await cache.encode([_request()], encoder.encode_many)
        return first, hits_first, again, hits_again

    hits_before, misses_before = HITS._value.get(), MISSES._value.get()
    first, hits_first, again, hits_again = _run(scenario())
    assert (hits_first, hits_again) == (0, 1)
    assert len(encoder.calls) == 1
    assert again[0].SerializeToString() == first[0].SerializeToString()
    assert (cache.hits, cache.misses) == (1, 1)
    assert (HITS._value.get() - hits_before, MISSES._value.get() - misses_before) == (1, 1)
    assert cache.bytes == len(first[0].SerializeToString()) and BYTES._value.get() >= cache.bytes


@pytest.mark.parametrize(
    "changed",
    [
        {"prompt": "a dog"},
        {"prompts_2": ["a cat, in T5"]},
        {"max_sequence_length": 128},
        {"loras": [("style", 1.0)]},
        {"loras": [("style", 0.5)]},
        {"loras": [("other", 1.0)]},
    ],
)
def test_everything_that_changes_the_embedding_changes_the_key(changed):
    encoder = FakeEncoder()
    cache = PromptCache(1 << 20, encoder.info)
    # a LoRA added to none; another weight or another LoRA than style at 1.0
    base = {"loras": [("style", 1.0)]} if changed.get("loras", [("style", 1.0)]) != [("style", 1.0)] else {}

    async def scenario():
        await cache.encode([_request(**base)], encoder.encode_many)
        return await cache.encode([_request(**{**base, **changed})], encoder.encode_many)

    _, hits = _run(scenario())
    assert hits == 0 and len(encoder.calls) == 2


def test_another_encoder_model_is_another_key_and_no_identity_is_no_cache(monkeypatch):
    import fluxmesh.orchestrator.prompt_cache as module

    monkeypatch.setattr(module, "IDENTITY_SECONDS", 0.0)  # ask the encoder every time
    encoder = FakeEncoder(identity="model-a")
    cache = PromptCache(1 << 20, encoder.info)

    async def scenario():
        await cache.encode([_request()], encoder.encode_many)
        encoder.identity = "model-b"  # e.g. the encoder restarted on other weights or LoRA files changed
        _, hits_b = await cache.encode([_request()], encoder.encode_many)
        encoder.identity = ""  # an encoder that cannot say what it is: never cached
        await cache.encode([_request()], encoder.encode_many)
        _, hits_none = await cache.encode([_request()], encoder.encode_many)
        return hits_b, hits_none

    assert _run(scenario()) == (0, 0)
    assert len(encoder.calls) == 4


def test_bounded_by_bytes_least_recently_used_out_and_zero_is_off():
    encoder = FakeEncoder(size=1000)
    one = len(_run(encoder.encode_many([_request("p0")]))[0].SerializeToString())
    encoder.calls.clear()
    cache = PromptCache(3 * one + one // 2, encoder.info)  # room for three replies

    async def scenario():
        for prompt in ("p0", "p1", "p2"):
            await cache.encode([_request(prompt)], encoder.encode_many)
        await cache.encode([_request("p0")], encoder.encode_many)  # p0 used: p1 is now the oldest
        await cache.encode([_request("p3")], encoder.encode_many)  # evicts p1
        return [(await cache.encode([_request(p)], encoder.encode_many))[1] for p in ("p0", "p2", "p3", "p1")]

    assert _run(scenario()) == [1, 1, 1, 0]
    assert cache.bytes <= cache.max_bytes

    off = PromptCache(0, encoder.info)
    encoder.calls.clear()
    _run(off.encode([_request()], encoder.encode_many))
    _, hits = _run(off.encode([_request()], encoder.encode_many))
    assert hits == 0 and len(encoder.calls) == 2 and off.bytes == 0


def test_a_burst_of_one_prompt_is_encoded_once_and_a_failed_call_is_not_shared():
    encoder = FakeEncoder(delay=0.05)
    cache = PromptCache(1 << 20, encoder.info)

    async def burst():
        return await asyncio.gather(*(cache.encode([_request("same")], encoder.encode_many) for _ in range(6)))

    results = _run(burst())
    assert len(encoder.calls) == 1
    assert sorted(hits for _, hits in results) == [0, 1, 1, 1, 1, 1]
    assert len({replies[0].SerializeToString() for replies, _ in results}) == 1

    encoder.calls.clear()
    encoder.fail = True
    failing = PromptCache(1 << 20, encoder.info)

    async def failed_burst():
        return await asyncio.gather(
            *(failing.encode([_request("x")], encoder.encode_many) for _ in range(3)), return_exceptions=True
        )

    outcomes = _run(failed_burst())
    assert all(isinstance(o, RuntimeError) for o in outcomes)
    assert len(encoder.calls) == 3  # each waiter tried itself once the leader failed; nothing cached
    assert failing.bytes == 0


def test_the_encoder_identity_follows_its_lora_files(dev_model, tmp_path):
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.runtime.device import Device

    engine = TextEncoderEngine(dev_model, Device.parse("cpu"), lora_dir=tmp_path, load=False)
    before = engine.identity()
    assert engine.identity() == before  # stable
    lora = tmp_path / "style.safetensors"
    lora.write_bytes(b"x" * 10)
    added = engine.identity()
    os.utime(lora, ns=(time.time_ns() + 10**9,) * 2)
    assert len({before, added, engine.identity()}) == 3


def test_end_to_end_a_repeat_skips_the_encoder_and_keeps_the_pixels(dev_cluster, dev_model):
    prompt = "a lighthouse at dusk, cached"  # unique to this test: the session cluster is shared
    options = {"width": 64, "height": 64, "steps": 2, "guidance": 3.5}

    def encoder_requests(client) -> int:
        return int(next(s for s in client.info().stages if s.stage == "encoder").details["requests"])

    with Client(dev_cluster.address, timeout=120) as client:
        first = client.generate(prompt, seed=3, **options)
        encoded = encoder_requests(client)
        again = client.generate(prompt, seed=4, **options)
        assert encoder_requests(client) == encoded  # the encoder never saw the repeat
        other = client.generate(prompt + "!", seed=4, **options)
    assert (first.timings.cached_encodes, again.timings.cached_encodes, other.timings.cached_encodes) == (0, 1, 0)
    expected = reference_images(dev_model, prompt=prompt, seed=4, steps=2, guidance=3.5, width=64, height=64)[0]
    assert max_abs_diff(again.image, expected) <= 1
