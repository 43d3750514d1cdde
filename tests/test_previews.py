"""Live previews in the progress stream.

fast: made in the denoiser from the x0 estimate by a linear latent -> RGB map, on the steps asked
for, one small JPEG per image at latent resolution. vae: the x0 estimate decoded by the vae stage
while denoising goes on, never stalling it nor the result (proved with the vae stage made slow
for previews by FLUXMESH_TEST_PREVIEW_DELAY).
"""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest
import torch
from PIL import Image

from factories import PROMPT, init_and_mask, max_abs_diff, pearson
from fluxmesh.client import Client, Result, Step

# Pearson r of the last fast preview against the final image box-downscaled to the preview's size,
# on the tiny random-weight models (whose map the vae stage fits on their own decoder): measured
# 0.55-0.63 on the tiny dev model and 0.51-0.63 on `small`, seeds 0-7 at 64, 128 and 256 px. The
# bound: r >= 0.4. With the published FLUX.1 map r is about 0 on these models (checked below).
MIN_CORRELATION = 0.4


def _steps(events) -> list[Step]:
    return [e for e in events if isinstance(e, Step)]


def test_fast_previews_come_every_n_steps_at_latent_size(dev_cluster):
    with Client(dev_cluster.address, timeout=120) as client:
        events = list(
            client.stream(PROMPT, width=96, height=64, steps=7, seed=3, num_images=2, preview="fast", preview_every=2)
        )
    steps = _steps(events)
    assert [s.step for s in steps] == list(range(1, 8))  # every step still has its event, once
    with_previews = [s for s in steps if s.previews]
    assert [s.step for s in with_previews] == [2, 4, 6]
    assert all(s.preview_step == s.step for s in with_previews)
    for s in with_previews:
        assert len(s.previews) == 2  # one per image
        assert all(p.size == (12, 8) and p.mode == "RGB" and p.format == "JPEG" for p in s.previews)
        assert all(data[:3] == b"\xff\xd8\xff" for data in s.preview_data)
    result = events[-1]
    assert isinstance(result, Result) and [i.size for i in result.images] == [(96, 64)] * 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_last_fast_preview_correlates_with_the_final_image(dev_cluster, seed):
    with Client(dev_cluster.address, timeout=120) as client:
        events = list(client.stream(PROMPT, width=128, height=128, steps=4, seed=seed, preview="fast"))
    last = _steps(events)[-1]
    assert last.step == last.preview_step == 4
    final = events[-1].image.resize(last.previews[0].size, Image.BOX)
    assert pearson(last.previews[0], final) >= MIN_CORRELATION


def test_inpainting_previews_show_the_kept_region_as_the_original(dev_cluster):
    """Outside the mask an inpainting keeps the original, and its previews show it from the first
    step: two requests that differ in seed and prompt have the same preview there, and different
    ones inside the mask."""
    init, mask = init_and_mask(width=256, height=256)
    first_previews = []
    with Client(dev_cluster.address, timeout=120) as client:
        for seed, prompt in ((1, PROMPT), (2, "a blue whale")):
            events = client.stream(
                prompt,
                width=256,
                height=256,
                steps=4,
                seed=seed,
                init_image=init,
                mask_image=mask,
                strength=1.0,
                preview="fast",
                preview_every=1,
            )
            first_previews.append(np.asarray(_steps(list(events))[0].previews[0], dtype=np.float64))
    size = first_previews[0].shape[1::-1]
    small_mask = np.asarray(mask.resize(size, Image.BOX), dtype=np.float64)
    # JPEG blocks and chroma straddle the mask's edge: compare away from it.
    near_edge = np.zeros_like(small_mask, dtype=bool)
    near_edge[size[1] // 4 - 3 : 3 * size[1] // 4 + 3, size[0] // 4 - 3 : 3 * size[0] // 4 + 3] = True
    near_edge[size[1] // 4 + 3 : 3 * size[1] // 4 - 3, size[0] // 4 + 3 : 3 * size[0] // 4 - 3] = False
    kept, repainted = (small_mask == 0) & ~near_edge, (small_mask == 255) & ~near_edge
    difference = np.abs(first_previews[0] - first_previews[1])
    assert kept.sum() > 100 and repainted.sum() > 20
    # Measured: kept 1.1 (JPEG noise only), repainted 3.7; without the blend the kept region differed
    # as much as the repainted one (4.0 against 4.2).
    assert difference[kept].mean() < 2.0
    assert difference[repainted].mean() > 1.5 * difference[kept].mean() + 1.0


def test_vae_stage_reports_a_map_fitted_on_its_own_decoder(dev_cluster, dev_model):
    """The tiny VAE is not FLUX.1's, so the vae stage fits the map on its decoder and reports it;
    on that decoder the fit correlates with decoded images and the published FLUX.1 map (the
    denoiser's fallback) does not: the correlation bound above measures the fit."""
    from diffusers import AutoencoderKL

    from fluxmesh.services.denoiser.previews import project_packed
    from fluxmesh.services.previews.latent_rgb import LatentRgb

    with Client(dev_cluster.address, timeout=120) as client:
        vae_info = next(s for s in client.info().stages if s.stage == "vae")
    fitted = LatentRgb.from_flat(vae_info.latent_rgb, 16)
    vae = AutoencoderKL.from_pretrained(dev_model, subfolder="vae")
    latents = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(7))  # unseen by the fit
    with torch.inference_mode():
        image = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
    decoded = Image.fromarray(((image[0].permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
    target = decoded.resize((16, 16), Image.BOX)
    packed = latents.view(1, 16, 8, 2, 8, 2).permute(0, 2, 4, 1, 3, 5).reshape(1, 64, 64)  # as FLUX packs
    r_fit = pearson(Image.fromarray(project_packed(packed, 128, 128, 8, fitted)[0]), target)
    r_flux = pearson(Image.fromarray(project_packed(packed, 128, 128, 8, LatentRgb.flux())[0]), target)
    assert r_fit >= MIN_CORRELATION and abs(r_flux) < 0.2, (r_fit, r_flux)


async def test_async_client_gives_previews_as_pil_images(dev_cluster):
    from fluxmesh.client import AsyncClient

    init, _ = init_and_mask()
    async with AsyncClient(dev_cluster.address, timeout=120) as client:
        steps = [
            e
            async for e in client.stream(
                PROMPT,
                width=64,
                height=64,
                steps=10,
                seed=2,
                init_image=init,
                strength=0.5,
                preview="fast",
                preview_every=2,
            )
            if isinstance(e, Step)
        ]
    # strength 0.5 of 10 steps runs 5: previews at steps 2 and 4 of 5
    assert [(s.step, s.total) for s in steps] == [(i, 5) for i in range(1, 6)]
    assert [s.step for s in steps if s.previews] == [2, 4]
    assert all(isinstance(p, Image.Image) and p.size == (8, 8) for s in steps for p in s.previews)


def test_vae_previews_arrive_decoded_at_full_size(dev_cluster):
    with Client(dev_cluster.address, timeout=120) as client:
        events = list(client.stream(PROMPT, width=96, height=64, steps=16, seed=4, preview="vae", preview_every=1))
    steps = _steps(events)
    assert sorted({s.step for s in steps}) == list(range(1, 17))
    decoded = [s for s in steps if s.previews]
    assert decoded, "no vae preview came back in 16 steps"
    for s in decoded:
        assert 1 <= s.preview_step <= s.step
        assert [p.size for p in s.previews] == [(96, 64)] and s.previews[0].format == "JPEG"
    shown = [s.preview_step for s in decoded]
    assert shown == sorted(shown) and len(set(shown)) == len(shown)  # in order, never twice


@pytest.fixture(scope="module")
def slow_preview_cluster(dev_model):
    """The tiny dev model with the vae stage taking 5 s longer for every preview decode."""
    from mesh import Mesh

    with Mesh(dev_model, env={"FLUXMESH_TEST_PREVIEW_DELAY": str(SLOW_PREVIEW_SECONDS)}).start_all() as cluster:
        yield cluster


SLOW_PREVIEW_SECONDS = 5.0


def _vae_requests(client: Client) -> int:
    return int(next(s for s in client.info().stages if s.stage == "vae").details["requests"])


def test_slow_vae_previews_stall_neither_denoising_nor_the_result(slow_preview_cluster):
    init, mask = init_and_mask()
    with Client(slow_preview_cluster.address, timeout=120) as client:
        before = _vae_requests(client)
        started = time.monotonic()
        arrivals = []
        for event in client.stream(
            PROMPT,
            width=64,
            height=64,
            steps=8,
            seed=5,
            preview="vae",
            preview_every=2,
            init_image=init,
            mask_image=mask,
            strength=1.0,
        ):
            arrivals.append((time.monotonic() - started, event))
        after = _vae_requests(client)
        plain = client.generate(
            PROMPT, width=64, height=64, steps=8, seed=5, init_image=init, mask_image=mask, strength=1.0
        )
    steps = [(t, e) for t, e in arrivals if isinstance(e, Step)]
    result_at, result = arrivals[-1]
    assert isinstance(result, Result)
    assert [e.step for _, e in steps] == list(range(1, 9))
    # Each preview takes 5 s on the vae stage; a stalling relay would space steps by that much,
    # and a result that waited for the previews in flight would come 5 s after the last step.
    assert result_at < SLOW_PREVIEW_SECONDS, arrivals
    assert all(b - a < SLOW_PREVIEW_SECONDS / 2 for (a, _), (b, _) in zip(steps, steps[1:]))
    assert after - before >= 3  # image encode + final decode + at least one preview was sent
    assert not any(e.previews for _, e in steps)  # none could finish in time: dropped, not awaited
    assert max_abs_diff(result.image, plain.image) == 0  # previews change nothing in the result


# -- the relay's rules, without processes ------------------------------------------------------


class _FakeDecode:
    """A vae stage stand-in: records what it was asked to decode, finishes when told to."""

    def __init__(self):
        self.calls: list[int] = []
        self.release = asyncio.Event()
        self.cancelled = 0

    async def __call__(self, x0):
        self.calls.append(x0.shape[0])
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return []


def _x0(step: int):
    from fluxmesh.v1 import common_pb2

    return common_pb2.Tensor(dtype="float32", shape=[step], data=b"")


async def test_relay_keeps_one_decode_in_flight_and_skips_stale_estimates():
    from fluxmesh.orchestrator.previews import VaePreviews

    decode = _FakeDecode()
    previews = VaePreviews(decode)
    for step in range(1, 6):
        previews.offer(step, _x0(step))  # returns at once, never awaits the decode
    await asyncio.sleep(0)
    assert decode.calls == [1]  # one in flight; 2-4 replaced by newer ones, 5 waits
    assert previews.skipped == 3
    decode.release.set()
    assert (await previews.ready()).step == 1
    assert (await previews.ready()).step == 5
    assert decode.calls == [1, 5]


async def test_relay_close_cancels_the_decode_in_flight():
    from fluxmesh.orchestrator.previews import VaePreviews

    decode = _FakeDecode()
    previews = VaePreviews(decode)
    previews.offer(1, _x0(1))
    previews.offer(2, _x0(2))
    await asyncio.sleep(0)
    await previews.close()
    assert decode.cancelled == 1 and decode.calls == [1]  # the waiting one never started


def test_x0_scheduler_changes_nothing_and_ends_on_the_final_latents(dev_model):
    """The x0-keeping scheduler gives the same latents, and its last x0 is the final latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxmesh.services.denoiser.previews import X0Scheduler

    config = FlowMatchEulerDiscreteScheduler.load_config(dev_model, subfolder="scheduler")
    plain, keeping = FlowMatchEulerDiscreteScheduler.from_config(config), X0Scheduler.from_config(config)
    for scheduler in (plain, keeping):
        scheduler.set_timesteps(4, mu=0.8)
    generator = torch.Generator().manual_seed(0)
    a = b = torch.randn(1, 16, 64, generator=generator)
    for t in plain.timesteps:
        v = torch.randn(1, 16, 64, generator=generator)
        a = plain.step(v, t, a, return_dict=False)[0]
        b = keeping.step(v, t, b, return_dict=False)[0]
    assert torch.equal(a, b)
    assert torch.allclose(keeping.x0, b, atol=1e-6)


def test_fast_projection_equals_unpack_then_project():
    from diffusers import FluxPipeline

    from fluxmesh.services.denoiser.previews import project_packed
    from fluxmesh.services.previews.latent_rgb import LatentRgb

    rgb = LatentRgb.flux()
    packed = torch.randn(2, 4 * 6, 64, generator=torch.Generator().manual_seed(1))  # 64x96 image
    latents = FluxPipeline._unpack_latents(packed, 64, 96, 8)  # (2, 16, 8, 12)
    expected = torch.einsum("bchw,cr->bhwr", latents, torch.from_numpy(rgb.factors)) + torch.from_numpy(rgb.bias)
    expected = ((expected + 1) * 127.5).clamp(0, 255).numpy()
    got = project_packed(packed, 64, 96, 8, rgb)
    assert got.shape == (2, 8, 12, 3) and got.dtype == np.uint8
    assert np.abs(got.astype(np.float64) - expected).max() <= 0.5 + 1e-3


def test_sequential_mode_sends_fast_previews_for_vae_ones():
    from fluxmesh.orchestrator.previews import preview_options
    from fluxmesh.orchestrator.request import PreviewParams

    options, warning = preview_options(PreviewParams("vae", 3), vae_alongside_denoiser=True, latent_rgb=[])
    assert options.x0 and not options.fast and options.every == 3 and warning is None
    options, warning = preview_options(PreviewParams("vae", 3), vae_alongside_denoiser=False, latent_rgb=[1.0] * 51)
    assert options.fast and not options.x0 and len(options.latent_rgb) == 51 and "sequential" in warning
