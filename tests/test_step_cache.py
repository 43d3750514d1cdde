"""Step caching through diffusers' cache hooks, opt-in per request: off or threshold 0 is
today's pixels exactly; with it on, compute is really skipped (counted here by an independent
count of the attention processors that ran, not by the flag); the server's ceiling and the
field names in errors; caching requests never share a forward; end to end, Result says what was
skipped."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from factories import PROMPT
from fluxmesh.client import Client, FluxmeshError
from fluxmesh.rpc.errors import InvalidArgument


@pytest.fixture(scope="module")
def engine(dev_model):
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.denoiser.step_cache import StepCacheLimits
    from fluxmesh.services.runtime.device import Device

    return DenoiserEngine(dev_model, Device.parse("cpu"), step_cache=StepCacheLimits(ceiling=2.0))


def _job(engine, cache=None, **overrides):
    from fluxmesh.services.denoiser.engine import DenoiseJob
    from fluxmesh.services.denoiser.step_cache import StepCachePolicy

    generator = torch.Generator().manual_seed(0)
    fields = dict(
        prompt_embeds=torch.randn(1, 8, engine.joint_attention_dim, generator=generator),
        pooled_prompt_embeds=torch.randn(1, engine.pooled_projection_dim, generator=generator),
        width=64,
        height=64,
        steps=10,
        guidance=3.5,
        seed=11,
        num_images=1,
        cache=StepCachePolicy(*cache) if cache else None,
    )
    return DenoiseJob(**{**fields, **overrides})


class ProcessorCount:
    """How many attention computations really ran: every block's attention processor, wrapped."""

    def __init__(self, transformer):
        self.count = 0
        self.attentions = [
            block.attn
            for name in ("transformer_blocks", "single_transformer_blocks")
            for block in getattr(transformer, name)
        ]
        self.originals = [attn.processor for attn in self.attentions]

    def __enter__(self):
        for attn, processor in zip(self.attentions, self.originals):

            def counting(*args, _processor=processor, **kwargs):
                self.count += 1
                return _processor(*args, **kwargs)

            attn.processor = counting
        return self

    def __exit__(self, *exc):
        for attn, processor in zip(self.attentions, self.originals):
            attn.processor = processor


def _run(engine, job):
    with torch.inference_mode():
        return engine.denoise_cached(job) if not engine.batchable(job) else (engine.denoise(job), None)


@pytest.mark.parametrize("cache", [None, ("off", 0.0), ("first-block", 0.0), ("mag", 0.0), ("taylorseer", 0.0)])
def test_off_or_threshold_zero_is_todays_pixels_exactly(engine, cache):
    plain, _ = _run(engine, _job(engine))
    job = _job(engine, cache)
    assert engine.batchable(job)  # nothing installed: it batches like any request
    latents, blocks = _run(engine, job)
    assert blocks is None and torch.equal(latents, plain)


@pytest.mark.parametrize("cache", [("first-block", 1.5), ("mag", 1.5), ("taylorseer", 2.0)])
def test_caching_really_skips_attention_and_says_how_much(engine, cache):
    plain, _ = _run(engine, _job(engine))
    blocks_per_forward = len(engine.transformer.transformer_blocks) + len(engine.transformer.single_transformer_blocks)
    with ProcessorCount(engine.transformer) as counted:
        latents, (run, skipped) = _run(engine, _job(engine, cache))
    assert counted.count == run  # the report is what really ran
    assert skipped > 0 and run + skipped == 10 * blocks_per_forward
    assert torch.isfinite(latents).all() and not torch.equal(latents, plain)
    assert not engine.transformer.is_cache_enabled  # hooks removed after the request
    again, _ = _run(engine, _job(engine))
    assert torch.equal(again, plain)  # and the next request computes every block again


def test_the_ceiling_and_bad_kinds_name_the_field(engine):
    from fluxmesh.rpc import step_cache
    from fluxmesh.v1 import common_pb2

    with pytest.raises(InvalidArgument, match="cache.threshold"):
        engine.check(_job(engine, ("first-block", 2.5)))
    with pytest.raises(InvalidArgument, match="cache.threshold"):
        engine.check(_job(engine, ("taylorseer", 2.5)))
    with pytest.raises(InvalidArgument, match="cache.kind"):
        step_cache.from_pb(common_pb2.StepCache(kind=common_pb2.STEP_CACHE_KIND_UNSPECIFIED))
    with pytest.raises(InvalidArgument, match="cache"):
        step_cache.parse("fast:0.1")
    assert step_cache.parse("first-block") == ("first-block", 0.05)
    assert step_cache.parse("mag:0.1") == ("mag", 0.1)


def test_caching_requests_never_share_a_forward(engine, monkeypatch):
    from fluxmesh.services.denoiser import batching
    from fluxmesh.services.runtime.worker import ModelWorker

    shared: list[int] = []
    real = batching.forward
    monkeypatch.setattr(
        batching, "forward", lambda transformer, lanes: (shared.append(len(lanes)), real(transformer, lanes))[1]
    )
    worker = ModelWorker("test-cache", own_thread=True)
    batcher = batching.Batcher(engine, worker, max_batch=4)
    jobs = [_job(engine, ("first-block", 1.5), seed=s) for s in (1, 2)] + [_job(engine, seed=3), _job(engine, seed=4)]

    async def scenario():
        return await asyncio.gather(*(batcher.denoise(job) for job in jobs))

    results = asyncio.run(scenario())
    worker.shutdown()
    assert [r.blocks is not None for r in results] == [True, True, False, False]
    assert all(r.blocks[1] > 0 for r in results[:2])
    assert max(shared) <= 2  # the two plain ones may share; the cached ones ran apart (not through forward)
    for job, result in zip(jobs[:2], results[:2]):
        assert torch.equal(result.latents, _run(engine, job)[0])  # as it gets alone


def test_end_to_end_result_reports_skipped_blocks(dev_cluster):
    with Client(dev_cluster.address, timeout=120) as client:
        cached = client.generate(PROMPT, width=64, height=64, steps=8, seed=2, cache="first-block:0.9")
        plain = client.generate(PROMPT, width=64, height=64, steps=8, seed=2)
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=64, height=64, steps=2, cache="first-block:5")  # above the ceiling
    assert cached.blocks_skipped > 0 and cached.blocks_run > 0
    assert (plain.blocks_skipped, plain.blocks_run) == (0, 0)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "cache.threshold" in caught.value.message


def test_the_orchestrator_names_a_bad_cache_field_before_any_stage_runs(dev_cluster):
    from fluxmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc

    def work_done() -> dict[str, int]:
        with Client(dev_cluster.address) as client:
            return {stage.stage: int(stage.details["requests"]) for stage in client.info().stages}

    before = work_done()
    for cache, field in (
        (common_pb2.StepCache(), "cache.kind"),
        (common_pb2.StepCache(kind=common_pb2.STEP_CACHE_KIND_MAG, threshold=-1), "cache.threshold"),
    ):
        request = generator_pb2.GenerateRequest(prompt=PROMPT, width=64, height=64, steps=2, cache=cache)
        with grpc.insecure_channel(dev_cluster.address) as channel:
            with pytest.raises(grpc.RpcError) as caught:
                list(generator_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith(f"{field}:"), caught.value.details()
    assert work_done() == before
