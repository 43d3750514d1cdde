"""A stage's weights moved and dropped in process: the Residency helper on real tiny engines."""

from __future__ import annotations

import weakref

import pytest
import torch

from fluxmesh.contract import ReleaseTo
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.services.residency.state import Residency, residency_state
from fluxmesh.services.runtime.device import Device


def _job(dev_model, **overrides):
    from fluxmesh.services.denoiser.engine import DenoiseJob

    generator = torch.Generator().manual_seed(0)
    fields = dict(
        prompt_embeds=torch.randn(1, 8, 32, generator=generator),
        pooled_prompt_embeds=torch.randn(1, 32, generator=generator),
        width=64,
        height=64,
        steps=2,
        guidance=3.5,
        seed=7,
        num_images=1,
    )
    return DenoiseJob(**{**fields, **overrides})


@pytest.fixture
def denoiser(dev_model, tmp_path):
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from lora_fixtures import write_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    write_lora("peft", loras / "style.safetensors", dev_model, seed=3)
    return DenoiserEngine(dev_model, Device.parse("cpu"), lora_dir=loras, load=False)


def test_released_weights_refuse_calls_and_come_back_identical(denoiser, dev_model):
    residency = Residency("denoiser", denoiser, "released")
    assert residency_state(denoiser) == "released" and denoiser.weight_bytes() == 0
    with pytest.raises(FailedPrecondition, match="denoiser stage: weights are released"):
        residency.require_resident()

    assert residency.load() > 0 and residency.state == "resident"
    job = _job(dev_model)
    plain = denoiser.denoise(job)
    styled = denoiser.denoise(_job(dev_model, loras=(("style", 1.0),)))
    assert not torch.equal(plain, styled)  # the LoRA is active on the loaded transformer
    assert residency.load() == 0.0  # already there: nothing to do, nothing logged

    module = weakref.ref(denoiser.transformer)
    assert residency.release(ReleaseTo.disk) > 0
    assert module() is None, "the released transformer must be freed (LoRA adapters included)"
    assert residency.state == "released" and denoiser.weight_bytes() == 0
    assert residency.release(ReleaseTo.cpu) == 0.0  # nothing held: nothing to offload

    residency.load()  # read from the files again, LoRAs re-bound to the new module
    assert torch.equal(denoiser.denoise(job), plain)
    assert torch.equal(denoiser.denoise(_job(dev_model, loras=(("style", 1.0),))), styled)
    states = [(t.from_state, t.to_state) for t in residency.transitions]
    assert states == [("released", "resident"), ("resident", "released"), ("released", "resident")]
    assert all(t.finished_unix >= t.started_unix for t in residency.transitions)
    assert all(
        a.finished_unix <= b.started_unix for a, b in zip(residency.transitions, list(residency.transitions)[1:])
    )


def test_offloaded_keeps_weights_in_cpu_memory(dev_model):
    """On a CPU stage "offloaded" moves nothing (CPU memory is the device), but model calls are
    refused all the same until Load: the state means what it says."""
    from fluxmesh.services.vae.engine import VaeEngine

    vae = VaeEngine(dev_model, Device.parse("cpu"), load=False)
    residency = Residency("vae", vae, "standby")  # on CPU standby = released
    assert residency.state == "released"
    residency.load()
    held = vae.weight_bytes()
    residency.release(ReleaseTo.cpu)
    assert residency.state == "offloaded" and vae.weight_bytes() == held
    assert residency.snapshot()["device_weight_bytes"] == 0
    with pytest.raises(FailedPrecondition):
        residency.require_resident()
    residency.load()
    assert residency.snapshot()["device_weight_bytes"] == held


def test_unknown_initial_state_is_named(dev_model):
    from fluxmesh.services.vae.engine import VaeEngine

    with pytest.raises(InvalidArgument, match="residency: 'sideways'"):
        Residency("vae", VaeEngine(dev_model, Device.parse("cpu"), load=False), "sideways")


@pytest.mark.parametrize("release_to", [ReleaseTo.disk, ReleaseTo.cpu], ids=["release", "offload"])
@pytest.mark.parametrize("stage", ["encoder", "denoiser"])
def test_several_loras_survive_every_release_mode_on_the_model_thread(dev_model, tmp_path, stage, release_to):
    """As the servers run them: model calls under the worker's inference mode, transitions
    outside it. Adapters of two or more LoRAs used to be created in one mode and deleted in the
    other ("Setting requires_grad=True on inference tensor outside InferenceMode")."""
    import asyncio

    from fluxmesh.services.runtime.worker import ModelWorker
    from lora_fixtures import write_lora

    loras = tmp_path / "loras"
    loras.mkdir()
    for i, fmt in enumerate(("peft", "kohya", "peft")):
        write_lora(fmt, loras / f"l{i}.safetensors", dev_model, seed=10 + i)
    names = (("l0", 1.0), ("l1", 0.5), ("l2", -0.7))
    if stage == "denoiser":
        from fluxmesh.services.denoiser.engine import DenoiserEngine

        engine = DenoiserEngine(dev_model, Device.parse("cpu"), lora_dir=loras, load=False)

        def call(with_loras):
            return engine.denoise(_job(dev_model, loras=names if with_loras else ()))
    else:
        from fluxmesh.services.encoder.engine import TextEncoderEngine

        engine = TextEncoderEngine(dev_model, Device.parse("cpu"), lora_dir=loras, load=False)

        def call(with_loras):
            return engine.encode(["a fox"], [], 8, names if with_loras else ()).pooled_prompt_embeds

    residency = Residency(stage, engine, "released")
    worker = ModelWorker(stage)

    async def rounds():
        outputs = []
        for _ in range(3):
            await worker.run_unchecked(residency.load)
            outputs.append((await worker.run(call, True), await worker.run(call, False)))
            await worker.run_unchecked(residency.release, release_to)
        return outputs

    outputs = asyncio.run(rounds())
    styled, plain = outputs[0]
    assert not torch.equal(styled, plain)  # the LoRAs are active
    for again_styled, again_plain in outputs[1:]:
        assert torch.equal(again_styled, styled) and torch.equal(again_plain, plain)


# --- who may move the weights: the Residency RPCs on a real stage server, in process ---------


async def _serve_vae(dev_model, **options):
    from fluxmesh.rpc.server import Server
    from fluxmesh.services.app import StageOptions, build_service

    stage = StageOptions(stage="vae", model=str(dev_model), device="cpu", **options)
    server = Server(build_service(stage), address="127.0.0.1:0", security=stage.security)
    await server.start()
    return server


async def _residency(server, method: str, token: str | None = None):
    import grpc

    from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

    request = {
        "Load": residency_pb2.LoadRequest(),
        "Release": residency_pb2.ReleaseRequest(),
        "Status": residency_pb2.ResidencyStatusRequest(),
    }[method]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        try:
            reply = await getattr(residency_pb2_grpc.ResidencyStub(channel), method)(
                request, timeout=30, metadata=(("authorization", f"Bearer {token}"),) if token else None
            )
        except grpc.aio.AioRpcError as error:
            return error.code(), error.details()
    return grpc.StatusCode.OK, reply.state


async def test_a_resident_stage_without_credentials_takes_no_residency_orders(dev_model):
    """Anyone who reaches such a stage could otherwise unload it for good (nothing reloads it in
    resident mode): Load/Release are refused, Status still answers, the weights stay."""
    import grpc

    server = await _serve_vae(dev_model)
    try:
        for method in ("Release", "Load"):
            code, details = await _residency(server, method)
            assert code == grpc.StatusCode.PERMISSION_DENIED, (method, code, details)
            assert "residency control is off" in details and "--token-file" in details
        assert await _residency(server, "Status") == (grpc.StatusCode.OK, "resident")
    finally:
        await server.stop(0)


async def test_residency_orders_need_the_stage_credential_or_sequential_start(dev_model):
    import grpc

    from fluxmesh.rpc.security import ServerSecurity

    server = await _serve_vae(dev_model, security=ServerSecurity(tokens=("stage-secret",)))
    try:
        assert (await _residency(server, "Release"))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert (await _residency(server, "Release", "guess"))[0] == grpc.StatusCode.UNAUTHENTICATED
        assert await _residency(server, "Status", "stage-secret") == (grpc.StatusCode.OK, "resident")
        assert await _residency(server, "Release", "stage-secret") == (grpc.StatusCode.OK, "released")
        assert await _residency(server, "Load", "stage-secret") == (grpc.StatusCode.OK, "resident")
    finally:
        await server.stop(0)
    server = await _serve_vae(dev_model, residency="standby")  # started for sequential mode: its orders are on
    try:
        assert await _residency(server, "Load") == (grpc.StatusCode.OK, "resident")
    finally:
        await server.stop(0)
