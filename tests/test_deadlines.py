"""The client's deadline (or the orchestrator's cap) reaches every stage call, with the request id.

Python gRPC does not carry an incoming deadline to outgoing calls; the orchestrator must. Real
stages cannot say what deadline they were given, so these tests put recording stand-ins behind
a real orchestrator (in-process, on loopback) and read what each stage call carried.
Runtime: about 3 s.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from fluxmesh.orchestrator.app import OrchestratorOptions, build_server
from fluxmesh.rpc.server import Server, Service
from fluxmesh.v1 import (
    common_pb2,
    denoiser_pb2,
    denoiser_pb2_grpc,
    encoder_pb2,
    encoder_pb2_grpc,
    generator_pb2,
    generator_pb2_grpc,
    vae_pb2,
    vae_pb2_grpc,
)


class Recorder:
    """What each stage call saw: its deadline, its request id, and whether it was cancelled."""

    def __init__(self) -> None:
        self.seen: dict[str, tuple[float | None, str | None]] = {}
        self.cancelled: set[str] = set()
        self.hang: set[str] = set()  # stages that never answer

    async def record(self, stage: str, context) -> None:
        metadata = dict(context.invocation_metadata() or ())
        self.seen[stage] = (context.time_remaining(), metadata.get("x-request-id"))
        if stage in self.hang:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                self.cancelled.add(stage)
                raise


def _tensor(*shape: int) -> common_pb2.Tensor:
    count = 1
    for d in shape:
        count *= d
    return common_pb2.Tensor(dtype="float32", shape=list(shape), data=bytes(4 * count))


class FakeEncoder(encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    async def Info(self, request, context):  # the prompt cache asks for the encoder's identity
        return common_pb2.StageInfo(stage="encoder", identity="fake")

    async def Encode(self, request, context):
        await self.recorder.record("encoder", context)
        return encoder_pb2.EncodeResponse(
            prompt_embeds=_tensor(1, 4, 8), pooled_prompt_embeds=_tensor(1, 8), truncated_tokens=[0]
        )


class FakeDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    async def Info(self, request, context):
        return common_pb2.StageInfo(stage="denoiser", size_multiple=16, guidance_embeds=True)

    async def Denoise(self, request, context):
        await self.recorder.record("denoiser", context)
        yield denoiser_pb2.DenoiseEvent(step=denoiser_pb2.StepEvent(step=1, total=1, seconds=0.01))
        yield denoiser_pb2.DenoiseEvent(latents=_tensor(1, 16, 64))


class FakeVae(vae_pb2_grpc.VaeServicer):
    def __init__(self, recorder: Recorder):
        self.recorder = recorder

    async def Info(self, request, context):  # the orchestrator asks what the stage can do (a depth model)
        return common_pb2.StageInfo(stage="vae", size_multiple=16)

    async def Decode(self, request, context):
        await self.recorder.record("vae", context)
        return vae_pb2.DecodeResponse(images=[common_pb2.Image(width=64, height=64, data=b"png")])


@pytest.fixture
async def stack():
    """Recording stand-in stages on one port, and a real orchestrator in front of them."""
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
    orchestrator, monitor = build_server(
        OrchestratorOptions(encoder=address, denoiser=address, vae=address, address="127.0.0.1:0", request_timeout=2.0)
    )
    await orchestrator.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{orchestrator.port}")
    yield recorder, generator_pb2_grpc.GeneratorStub(channel)
    await channel.close()
    await orchestrator.stop(0)
    await stages.stop(0)


async def _generate(stub, *, timeout: float | None, metadata=None) -> list[generator_pb2.GenerateEvent]:
    request = generator_pb2.GenerateRequest(prompt="a cat", width=64, height=64, steps=1, seed=1)
    return [event async for event in stub.Generate(request, timeout=timeout, metadata=metadata)]


async def test_the_client_deadline_reaches_every_stage_with_the_request_id(stack):
    recorder, stub = stack
    events = await _generate(stub, timeout=1.5)  # sooner than the orchestrator's 2 s cap: the client's wins
    assert events[-1].HasField("result")
    for stage in ("encoder", "denoiser", "vae"):
        remaining, request_id = recorder.seen[stage]
        # set, and no later than the client's: what was left of 1.5 s when the stage was called
        assert remaining is not None and 0 < remaining <= 1.5 + 0.05, (stage, remaining)
        assert request_id == events[-1].request_id


async def test_a_longer_client_deadline_does_not_lift_the_orchestrators_cap(stack):
    """The cap bounds every request: a client asking for 7 s (or an hour) still gets 2 s."""
    recorder, stub = stack
    await _generate(stub, timeout=7.0)
    for stage in ("encoder", "denoiser", "vae"):
        remaining, _ = recorder.seen[stage]
        assert remaining is not None and 0 < remaining <= 2.05, (stage, remaining)
    recorder.hang.add("denoiser")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _generate(stub, timeout=3600.0)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 2.0 + 1.5


async def test_a_request_without_deadline_gets_the_orchestrators_cap(stack):
    recorder, stub = stack
    await _generate(stub, timeout=None)
    for stage in ("encoder", "denoiser", "vae"):
        remaining, _ = recorder.seen[stage]
        assert remaining is not None and 0 < remaining <= 2.05, (stage, remaining)  # grpc rounds up a little


async def test_a_well_formed_client_request_id_is_adopted_and_a_malformed_one_is_not(stack):
    recorder, stub = stack
    events = await _generate(stub, timeout=5, metadata=(("x-request-id", "client-42"),))
    assert {e.request_id for e in events} == {"client-42"}
    assert recorder.seen["vae"][1] == "client-42"
    for forged in ("two words", "x" * 65, "id]: FAKE LINE"):
        events = await _generate(stub, timeout=5, metadata=(("x-request-id", forged),))
        assert events[-1].request_id not in ("", forged)
        assert recorder.seen["vae"][1] == events[-1].request_id


async def test_a_stage_that_hangs_is_cut_off_at_the_deadline_and_cancelled(stack):
    recorder, stub = stack
    recorder.hang.add("denoiser")
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _generate(stub, timeout=None)  # no client deadline: the orchestrator's 2 s cap applies
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "denoiser" in caught.value.details()
    assert time.monotonic() - started < 2.0 + 1.5
    for _ in range(50):
        if "denoiser" in recorder.cancelled:
            break
        await asyncio.sleep(0.02)
    assert "denoiser" in recorder.cancelled  # the stage's call ended too: nothing left hanging


# --- the orchestrator's own deadline arithmetic, with stand-in stage clients ---------------------


class _Context:
    """A servicer context whose call has `remaining` seconds left (None: no deadline)."""

    def __init__(self, remaining: float | None):
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining

    def invocation_metadata(self) -> tuple:
        return ()


class _SlowInfo:
    """A stage client whose Info takes `seconds` and records the timeout it was given."""

    def __init__(self, stage: str, seconds: float = 0.0):
        self.stage, self.seconds, self.timeouts = stage, seconds, []

    async def info(self, timeout: float | None = None) -> common_pb2.StageInfo:
        self.timeouts.append(timeout)
        await asyncio.sleep(self.seconds)
        return common_pb2.StageInfo(stage=self.stage, size_multiple=16, guidance_embeds=True)

    async def list_loras(self, timeout: float | None) -> common_pb2.ListLorasResponse:
        self.timeouts.append(timeout)
        return common_pb2.ListLorasResponse()


def _servicer(*clients):
    from fluxmesh.orchestrator.admission import AdmissionQueue
    from fluxmesh.orchestrator.generator import GeneratorServicer
    from fluxmesh.orchestrator.stages import Stages

    return GeneratorServicer(Stages(*clients), AdmissionQueue(max_active=1, max_waiting=1))


def test_an_expired_deadline_stays_expired():
    from fluxmesh.orchestrator.deadlines import Deadline

    expired = Deadline.of_call(_Context(0.0), cap_seconds=60)
    assert expired.left() == 0.0 and expired.left(5.0) == 0.0 and expired.expired()
    assert Deadline.of_call(_Context(None)).left(5.0) == 5.0  # no deadline at all: the default
    assert 59 < Deadline.of_call(_Context(None), cap_seconds=60).left(5.0) <= 60
    assert 9 < Deadline.of_call(_Context(10.0), cap_seconds=60).left() <= 10  # the sooner of the two


async def test_info_and_list_loras_pass_an_expired_deadline_on_instead_of_five_more_seconds():
    """A call whose deadline has run out (0.0 left) is not given 5 or 10 seconds more."""
    clients = [_SlowInfo(stage) for stage in ("encoder", "denoiser", "vae")]
    servicer = _servicer(*clients)
    await servicer.Info(common_pb2.InfoRequest(), _Context(0.0))
    await servicer.ListLoras(common_pb2.ListLorasRequest(), _Context(0.0))
    # encoder: Info, facts; denoiser: Info, facts, ListLoras; vae: Info, facts
    assert [c.timeouts for c in clients] == [[0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0]]
    fresh = [_SlowInfo(stage) for stage in ("encoder", "denoiser", "vae")]
    await _servicer(*fresh).Info(common_pb2.InfoRequest(), _Context(None))
    assert all(0 < t <= 5.0 for c in fresh for t in c.timeouts)  # no deadline: Info's own 5 s


async def test_info_asks_the_three_stages_at_once():
    clients = [_SlowInfo(stage, seconds=0.4) for stage in ("encoder", "denoiser", "vae")]
    started = time.monotonic()
    info = await _servicer(*clients).Info(common_pb2.InfoRequest(), _Context(10.0))
    took = time.monotonic() - started
    assert [s.stage for s in info.stages] == ["encoder", "denoiser", "vae"] and info.size_multiple == 16
    assert took < 1.0, f"{took:.2f}s: one after another would take 1.2 s or more"
