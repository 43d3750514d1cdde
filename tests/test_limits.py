"""What one request may cost, and who decides: the contract's ceilings and work budget, lowered
by the orchestrator's flags, refused before admission; `fluxmesh plan` agreeing with the server;
the event loop kept free while a hostile request is checked.

The orchestrator is real (in process, on loopback) in front of recording stand-in stages
(tests/test_deadlines.py), so a refusal can be shown to reach no stage. Runtime: a few seconds.
"""

from __future__ import annotations

import asyncio
import io
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxmesh import contract
from fluxmesh.contract import LIMITS
from fluxmesh.orchestrator.app import OrchestratorOptions, build_server
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.rpc.server import Server, Service
from fluxmesh.v1 import denoiser_pb2_grpc, encoder_pb2_grpc, generator_pb2, generator_pb2_grpc, vae_pb2_grpc
from test_deadlines import FakeDenoiser, FakeEncoder, FakeVae, Recorder

LOWERED = LIMITS.lowered(max_side=512, max_steps=50, max_images=4, max_work=20.0)


@pytest.fixture
async def stack():
    """Stand-in stages, and a real orchestrator with LOWERED limits in front of them."""
    recorder = Recorder()
    stages = Server(
        [
            Service(
                "fluxmesh.v1.TextEncoder", FakeEncoder(recorder), encoder_pb2_grpc.add_TextEncoderServicer_to_server
            ),
            Service("fluxmesh.v1.Denoiser", FakeDenoiser(recorder), denoiser_pb2_grpc.add_DenoiserServicer_to_server),
            Service("fluxmesh.v1.Vae", FakeVae(recorder), vae_pb2_grpc.add_VaeServicer_to_server),
        ],
        address="127.0.0.1:0",
    )
    await stages.start()
    address = f"127.0.0.1:{stages.port}"
    orchestrator, _ = build_server(
        OrchestratorOptions(encoder=address, denoiser=address, vae=address, address="127.0.0.1:0", limits=LOWERED)
    )
    await orchestrator.start()
    recorder.orchestrator = f"127.0.0.1:{orchestrator.port}"
    channel = grpc.aio.insecure_channel(recorder.orchestrator)
    yield recorder, generator_pb2_grpc.GeneratorStub(channel), health_pb2_grpc.HealthStub(channel)
    await channel.close()
    await orchestrator.stop(0)
    await stages.stop(0)


async def _refusal(stub, request: generator_pb2.GenerateRequest) -> tuple[grpc.StatusCode, str]:
    try:
        async for _ in stub.Generate(request, timeout=30):
            pass
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details()
    return grpc.StatusCode.OK, ""


def test_work_is_megapixel_steps_and_true_cfg_counts_twice():
    assert contract.request_work(1024, 1024, 1, 28) == 28
    assert contract.request_work(2048, 2048, 8, 100, true_cfg=True) == 6400
    contract.check_work(2048, 2048, 1, 100)  # exactly the default budget of 400
    with pytest.raises(
        InvalidArgument,
        match=r"^INVALID_ARGUMENT: work: 2048x2048 x 8 images x 100 steps x 2 "
        r"\(true CFG\) = 6400 megapixel-steps exceeds the budget of 400",
    ):
        contract.check_work(2048, 2048, 8, 100, true_cfg=True)
    with pytest.raises(InvalidArgument, match="max_work: 500 must be within"):
        LIMITS.lowered(max_work=500)  # flags only lower


# (request fields, the field the refusal names) under LOWERED: side 512, steps 50, images 4, work 20
CASES = [
    ({"width": 1024, "height": 512}, "width: 1024 must be a multiple of 16 within [64, 512]"),
    ({"steps": 51}, "steps: 51 is outside [1, 50]"),
    ({"num_images": 5}, "num_images: 5 is outside [1, 4]"),
    ({"width": 512, "height": 512, "num_images": 4, "steps": 21}, "work: 512x512 x 4 images x 21 steps = 21 "),
    (
        {"width": 512, "height": 512, "num_images": 4, "steps": 11, "negative_prompt": "", "true_cfg_scale": 2.0},
        "work: 512x512 x 4 images x 11 steps x 2 (true CFG) = 22 ",
    ),
    ({"guidance": 1e38}, "guidance: 1e+38 must be finite within [0, 100]"),
]


@pytest.mark.parametrize("fields,refusal", CASES, ids=[c[1].split(":")[0] + str(i) for i, c in enumerate(CASES)])
async def test_a_request_over_a_lowered_ceiling_is_refused_before_any_stage(stack, fields, refusal):
    recorder, stub, _ = stack
    request = generator_pb2.GenerateRequest(
        **{"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 1, **fields}
    )
    code, details = await _refusal(stub, request)
    assert (code, details[: len(refusal)]) == (grpc.StatusCode.INVALID_ARGUMENT, refusal)
    assert recorder.seen == {}  # no stage did any work for it
    within = generator_pb2.GenerateRequest(prompt="a cat", width=512, height=512, num_images=4, steps=20, seed=1)
    assert (await _refusal(stub, within))[0] == grpc.StatusCode.OK  # exactly the budget: admitted


@pytest.mark.parametrize(
    "width,height,images,steps,true_cfg",
    [
        (512, 512, 4, 20, False),
        (512, 512, 4, 21, False),
        (512, 512, 4, 11, True),
        (1024, 512, 1, 1, False),
        (512, 512, 5, 1, False),
        (256, 256, 1, 51, False),
        (2048, 2048, 8, 100, True),
    ],
)
async def test_plan_and_the_server_agree_on_what_is_admissible(
    stack, dev_model, width, height, images, steps, true_cfg
):
    """`fluxmesh plan` with the orchestrator's limit flags gives the refusal the server gives."""
    from fluxmesh.services.tools.planning import make_plan

    _, stub, _ = stack
    cfg = {"negative_prompt": "", "true_cfg_scale": 2.0} if true_cfg else {}
    request = generator_pb2.GenerateRequest(
        prompt="a cat", width=width, height=height, num_images=images, steps=steps, seed=1, **cfg
    )
    code, served = await _refusal(stub, request)
    plan = make_plan(
        dev_model,
        vram=16 << 30,
        width=width,
        height=height,
        num_images=images,
        steps=steps,
        true_cfg=true_cfg,
        limits=LOWERED,
    )
    assert plan.refusal == served and (code == grpc.StatusCode.OK) == (served == "")


# A generous probe timeout: the test machine may be loaded many times over (measured on two
# cores at load 28: slowest answer 1.5 s, against more than 5 s, a timed-out probe, before).
HEALTH_TIMEOUT = 3.0


def _noise_png(side: int) -> bytes:
    """Slow to decode and large: a side x side grayscale of noise (PNG barely compresses it)."""
    pixels = np.random.default_rng(0).integers(0, 256, (side, side), dtype=np.uint8)
    buffer = io.BytesIO()
    from PIL import Image

    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


async def test_health_answers_while_hostile_requests_are_checked(stack):
    """A million-entry LoRA list used to be walked (twice: the enum check and the LoRA check),
    and 4096x4096 init images and masks decoded, on the orchestrator's event loop: health checks
    (and every other client) waited seconds. Requests go as ready bytes, so the test's own
    serialising is not on the loop; parsing the 14 MB message still is (grpc does it, ~0.3 s)."""
    recorder, _, health = stack
    loras = generator_pb2.GenerateRequest(prompt="a cat", width=64, height=64, steps=1, seed=1)
    for i in range(1_000_000):
        loras.loras.add(name=f"l{i}", weight=1.0)
    images = generator_pb2.GenerateRequest(
        prompt="a cat", steps=1, seed=1, init_image=_noise_png(4096), mask_image=_noise_png(4000)
    )  # refused once both are decoded
    channel = grpc.aio.insecure_channel(recorder.orchestrator)
    generate = channel.unary_stream(
        "/fluxmesh.v1.Generator/Generate", request_serializer=None, response_deserializer=None
    )

    async def send(data: bytes) -> tuple[grpc.StatusCode, str]:
        try:
            async for _ in generate(data, timeout=60):
                pass
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
        return grpc.StatusCode.OK, ""

    hostile = [asyncio.ensure_future(send(r.SerializeToString())) for r in (loras, images, images, images)]
    slowest, checks = 0.0, 0
    while not all(task.done() for task in hostile):
        started = time.monotonic()
        await health.Check(health_pb2.HealthCheckRequest(), timeout=HEALTH_TIMEOUT)  # before: timed out
        slowest, checks = max(slowest, time.monotonic() - started), checks + 1
        await asyncio.sleep(0.02)
    results = [task.result() for task in hostile]
    await channel.close()
    assert results[0] == (grpc.StatusCode.INVALID_ARGUMENT, "loras: 1000000 LoRAs; the limit is 8 per request")
    assert results[1] == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "mask_image: 4000x4000 differs from the init image's 4096x4096",
    )
    assert checks >= 2, f"{checks} health checks; the slowest took {slowest:.2f}s"


def test_the_denoiser_names_a_diverged_run_itself():
    """Latents that turned NaN used to reach the vae, which then blamed its input; the denoiser
    now checks its own output and names the inputs that may be the cause."""
    import torch

    from fluxmesh.services.denoiser.engine import DenoiseJob, _check_converged

    job = DenoiseJob(
        prompt_embeds=torch.zeros(1, 4, 8),
        pooled_prompt_embeds=torch.zeros(1, 8),
        width=64,
        height=64,
        steps=4,
        guidance=90.0,
        seed=1,
        num_images=1,
        loras=(("ink", 4.0),),
    )
    _check_converged(torch.zeros(1, 16, 64), job)
    with pytest.raises(
        InvalidArgument,
        match=r"^INVALID_ARGUMENT: latents: denoising diverged: the latents hold "
        r"NaN or Inf after 4 steps \(guidance 90, LoRAs ink@4\)",
    ):
        _check_converged(torch.tensor([[[0.0, float("nan")]]]), job)
