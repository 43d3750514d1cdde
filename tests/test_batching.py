"""Step-level continuous batching in the denoiser: every image of a batched request is the image
that request gets alone (within 1/255), with requests joining mid-way, different step counts,
guidances and seeds; different sizes never share a forward; a cancelled request leaves within
one step while the others carry on; and end to end through the four processes, the diffusers
pixels."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import numpy as np
import pytest
import torch

from factories import PROMPT, max_abs_diff, reference_images
from fluxmesh.client import Client
from fluxmesh.rpc.errors import Cancelled


@pytest.fixture(scope="module")
def engine(dev_model):
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.runtime.device import Device

    return DenoiserEngine(dev_model, Device.parse("cpu"))


def _job(engine, **overrides):
    from fluxmesh.services.denoiser.engine import DenoiseJob

    generator = torch.Generator().manual_seed(overrides.pop("embed_seed", 0))
    fields = {
        "prompt_embeds": torch.randn(1, 8, engine.joint_attention_dim, generator=generator),
        "pooled_prompt_embeds": torch.randn(1, engine.pooled_projection_dim, generator=generator),
        "width": 64,
        "height": 64,
        "steps": 6,
        "guidance": 3.5,
        "seed": 7,
        "num_images": 1,
    }
    return DenoiseJob(**{**fields, **overrides})


def _pixels(dev_model, latents: torch.Tensor, width: int, height: int) -> np.ndarray:
    """Packed latents -> uint8 images, as the vae stage (FluxPipeline's decode) makes them."""
    from factories import _pipeline

    pipe = _pipeline(str(dev_model))
    with torch.inference_mode():
        unpacked = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        unpacked = unpacked / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
        images = pipe.image_processor.postprocess(pipe.vae.decode(unpacked, return_dict=False)[0], output_type="np")
    return (images * 255).round().astype(np.int16)


@pytest.fixture
def forwards(monkeypatch):
    """Every shared forward the batcher runs: the jobs in it (by identity: each test's seeds differ)."""
    from fluxmesh.services.denoiser import batching

    seen: list[list] = []
    real = batching.forward

    def recording(transformer, lanes):
        seen.append(_Jobs(lane.job for lane in lanes))
        return real(transformer, lanes)

    monkeypatch.setattr(batching, "forward", recording)
    return seen


class _Jobs(list):
    """Jobs of one forward; `in` by identity (a DenoiseJob's == would compare tensors)."""

    def __contains__(self, job) -> bool:
        return any(j is job for j in self)


class Harness:
    """A Batcher on its own model thread, driven from an asyncio loop in this test's thread."""

    def __init__(self, engine, max_batch: int):
        from fluxmesh.services.denoiser.batching import Batcher
        from fluxmesh.services.runtime.worker import ModelWorker

        self.worker = ModelWorker("test-denoiser", own_thread=True)
        self.batcher = Batcher(engine, self.worker, max_batch)

    def alone(self, job) -> torch.Tensor:
        engine = self.batcher.engine
        with torch.inference_mode():
            return engine.denoise(job)


def _steps_seen() -> tuple[list[int], callable]:
    seen: list[int] = []
    return seen, lambda step, total, seconds, preview=None: seen.append(step)


def test_requests_joining_mid_way_get_the_image_they_get_alone(engine, dev_model, forwards):
    harness = Harness(engine, max_batch=4)
    first = _job(engine, steps=8, seed=1)
    joiners = [
        _job(engine, steps=5, seed=2, guidance=5.0, embed_seed=1),
        _job(engine, steps=3, seed=3, guidance=2.0, num_images=2, embed_seed=2),
    ]
    other_size = _job(engine, width=96, height=64, steps=4, seed=4)

    async def scenario():
        started = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_step(step, total, seconds, preview=None):
            if step == 2:
                loop.call_soon_threadsafe(started.set)

        running = asyncio.ensure_future(harness.batcher.denoise(first, on_step))
        await started.wait()  # the first request is two steps in: the others join it mid-way
        later = [harness.batcher.denoise(job) for job in (*joiners, other_size)]
        return await asyncio.gather(running, *later)

    results = [denoised.latents for denoised in asyncio.run(scenario())]
    harness.worker.shutdown()
    jobs = [first, *joiners, other_size]
    assert any(first in batch and joiners[0] in batch for batch in forwards), "the joiner never shared a forward"
    assert any(len(batch) >= 3 for batch in forwards)
    for batch in forwards:  # sizes never mix; nor does a batch exceed max_batch rows
        assert len({(job.width, job.height) for job in batch}) == 1
        assert sum(job.num_images for job in batch) <= 4
    assert harness.batcher.stats.joined_running >= 1
    for job, batched in zip(jobs, results):
        alone = harness.alone(job)
        assert batched.shape == alone.shape
        difference = np.abs(
            _pixels(dev_model, batched, job.width, job.height) - _pixels(dev_model, alone, job.width, job.height)
        ).max()
        assert difference <= 1, (job.seed, difference)


def test_a_cancelled_request_leaves_within_a_step_and_the_others_carry_on(engine, forwards):
    harness = Harness(engine, max_batch=4)
    keep, leave = _job(engine, steps=8, seed=5), _job(engine, steps=8, seed=6, embed_seed=3)
    cancel = threading.Event()
    steps_left, on_leave_step = _steps_seen()

    def leaving_step(step, total, seconds, preview=None):
        on_leave_step(step, total, seconds)
        if step == 3:
            cancel.set()  # as the servicer does when its caller goes away

    async def scenario():
        kept = asyncio.ensure_future(harness.batcher.denoise(keep))
        gone = asyncio.ensure_future(harness.batcher.denoise(leave, leaving_step, cancel))
        return await asyncio.gather(kept, gone, return_exceptions=True)

    kept, gone = asyncio.run(scenario())
    harness.worker.shutdown()
    assert isinstance(gone, Cancelled) and steps_left == [1, 2, 3]
    assert sum(leave in batch for batch in forwards) == 3  # not one forward more
    assert torch.allclose(kept.latents, harness.alone(keep), atol=1e-5)


def test_a_request_cancelled_before_its_first_step_costs_no_forward(engine, forwards):
    harness = Harness(engine, max_batch=4)
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(Cancelled, match="before the first step"):
        asyncio.run(harness.batcher.denoise(_job(engine), None, cancel))
    harness.worker.shutdown()
    assert forwards == []


def test_max_batch_one_runs_every_request_alone(engine, forwards):
    harness = Harness(engine, max_batch=1)
    jobs = [_job(engine, seed=s, steps=3) for s in (8, 9, 10)]

    async def scenario():
        return await asyncio.gather(*(harness.batcher.denoise(job) for job in jobs))

    results = asyncio.run(scenario())
    harness.worker.shutdown()
    assert forwards and all(len(batch) == 1 for batch in forwards)
    for job, result in zip(jobs, results):
        assert torch.equal(result.latents, harness.alone(job))  # alone is alone: bit for bit


def test_different_lora_sets_and_modes_do_not_share_a_forward(engine, dev_model):
    from fluxmesh.services.denoiser.batching import BatchKey
    from fluxmesh.services.denoiser.modes import InitImage

    plain = engine.lane(_job(engine))
    other_length = engine.lane(_job(engine, prompt_embeds=torch.randn(1, 16, engine.joint_attention_dim)))
    posterior = torch.randn(1, 2 * engine.latent_channels, 8, 8)
    img2img = engine.lane(_job(engine, init=InitImage(posterior, 0.6)))
    keys = {BatchKey.of(lane) for lane in (plain, other_length, img2img)}
    assert len(keys) == 3
    styled = BatchKey(**{**BatchKey.of(plain).__dict__, "loras": (("style", 1.0),)})
    assert styled != BatchKey.of(plain)


def test_end_to_end_concurrent_requests_batch_and_keep_the_diffusers_pixels(
    dev_cluster, dev_model, stage_addresses, stage_token
):
    import grpc

    from conftest import stage_metadata
    from fluxmesh.v1 import common_pb2, denoiser_pb2_grpc

    def largest_batch() -> int:
        with grpc.insecure_channel(stage_addresses["denoiser"]) as channel:
            info = denoiser_pb2_grpc.DenoiserStub(channel).Info(
                common_pb2.InfoRequest(), timeout=10, metadata=stage_metadata(stage_token)
            )
        return int(info.details["largest_batch"])

    requests = [
        {"seed": 31, "steps": 24, "guidance": 3.5},
        {"seed": 32, "steps": 20, "guidance": 4.5},
        {"seed": 33, "steps": 16, "guidance": 2.5},
    ]

    def one(options):
        with Client(dev_cluster.address, timeout=300) as client:
            return client.generate(PROMPT, width=64, height=64, **options)

    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(one, requests))
    assert largest_batch() >= 2  # they did share forwards
    for options, result in zip(requests, results):
        expected = reference_images(dev_model, width=64, height=64, **options)[0]
        assert max_abs_diff(result.image, expected) <= 1, options
