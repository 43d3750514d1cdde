"""The vae stage decodes a batch one image at a time: FluxPipeline's pixels, one image's
activation memory, and a cancelled request stops between images instead of decoding them all."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest
import torch

from fluxmesh.rpc.errors import Cancelled
from fluxmesh.services.runtime.device import Device


@pytest.fixture(scope="module")
def vae(dev_model):
    from fluxmesh.services.vae.engine import VaeEngine

    return VaeEngine(dev_model, Device.parse("cpu"))


def _latents(vae, images: int, side: int = 64) -> torch.Tensor:
    seq = (side // vae.size_multiple) ** 2
    return torch.randn(images, seq, vae.latent_channels * 4, generator=torch.Generator().manual_seed(3))


def test_one_image_at_a_time_gives_flux_pipelines_pixels(vae):
    """The oracle is FluxPipeline's own tail: the whole batch through vae.decode at once."""
    from diffusers import FluxPipeline

    latents = _latents(vae, 3)
    with torch.inference_mode():  # as the model thread runs it
        ours = [np.asarray(image, dtype=np.int16) for image in vae.decode(latents, 64, 64)]
    unpacked = FluxPipeline._unpack_latents(latents, 64, 64, vae.vae_scale_factor)
    with torch.inference_mode():
        batch = vae.vae.decode(
            unpacked / vae.vae.config.scaling_factor + vae.vae.config.shift_factor, return_dict=False
        )[0]
    theirs = [np.asarray(image, dtype=np.int16) for image in vae.image_processor.postprocess(batch, output_type="pil")]
    assert len(ours) == 3 and max(int(np.abs(a - b).max()) for a, b in zip(ours, theirs)) <= 1


def test_a_cancelled_decode_stops_between_images(vae, monkeypatch):
    cancelled, calls = threading.Event(), []
    decode = vae.vae.decode

    def first_then_cancel(latents, **kwargs):
        calls.append(latents.shape[0])
        cancelled.set()  # the caller goes away while the first image decodes
        return decode(latents, **kwargs)

    monkeypatch.setattr(vae.vae, "decode", first_then_cancel)
    with pytest.raises(Cancelled, match="cancelled after 1 of 4 images"), torch.inference_mode():
        vae.decode(_latents(vae, 4), 64, 64, cancelled)
    assert calls == [1]


async def test_the_servicer_stops_decoding_when_its_caller_goes_away(vae, monkeypatch):
    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.services.vae.servicer import VaeServicer
    from fluxmesh.v1 import common_pb2, vae_pb2

    servicer = VaeServicer(vae, "tiny")
    started, calls = threading.Event(), []
    decode = vae.vae.decode

    def slow(latents, **kwargs):
        calls.append(1)
        started.set()
        time.sleep(0.3)  # long enough for the cancellation to arrive mid-image
        return decode(latents, **kwargs)

    monkeypatch.setattr(vae.vae, "decode", slow)
    request = vae_pb2.DecodeRequest(
        latents=to_pb(_latents(vae, 4)), width=64, height=64, format=common_pb2.IMAGE_FORMAT_PNG
    )
    call = asyncio.ensure_future(servicer.Decode(request, None))
    await asyncio.to_thread(started.wait, 10)
    call.cancel()  # what grpc does to a handler whose client disconnected
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.to_thread(servicer.worker._executor.submit(lambda: None).result, 10)  # the model thread is free
    assert calls == [1], "images after the cancellation were decoded anyway"
