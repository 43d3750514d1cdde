"""Sequential mode: one stage's weights at a time, requests grouped by phase.

End to end (`fluxmesh up --sequential` on the `small` model, four real processes): a burst of 4
costs 3 swaps, by the stages' own transition logs no two stages ever held weights at once, the
images equal resident mode's exactly, and the stages' whole peak RSS is lower than resident
mode's. The scheduler's grouping rules are also checked alone, with fake stages.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import subprocess
import sys
import threading
import time

import grpc
import pytest

from conftest import stage_metadata
from factories import max_abs_diff
from fluxmesh.cli.supervisor import free_port, health_status
from fluxmesh.client import Client
from fluxmesh.orchestrator.residency.resident import SwapCost
from fluxmesh.orchestrator.residency.sequential import SequentialStrategy
from fluxmesh.rpc.errors import NOT_RESIDENT, FluxmeshError, reason_of
from fluxmesh.v1 import encoder_pb2, encoder_pb2_grpc, residency_pb2, residency_pb2_grpc
from mesh import SERVING, Mesh, up_stage_token, up_stages, wait_for_health

PROMPT = "a lighthouse on a cliff at dusk"
STAGES = ("encoder", "denoiser", "vae")


# --------------------------------------------------------------------------- the scheduler alone


class _Replicas:
    replicas = []


class _FakeStage:
    def __init__(self, stage: str):
        self.stage = stage
        self.replicas = _Replicas()


class FakeStrategy(SequentialStrategy):
    """SequentialStrategy with the Residency RPCs replaced by a log of what would be loaded."""

    def __init__(self, fail_loading: str | None = None):
        super().__init__([_FakeStage(s) for s in STAGES])
        self.on_device: set[str] = set()
        self.events: list[str] = []
        self.fail_loading = fail_loading

    async def _release(self, stage: str) -> bool:
        await asyncio.sleep(0.001)
        moved = stage in self.on_device
        self.on_device.discard(stage)
        return moved

    async def _load(self, stage: str) -> bool:
        assert not self.on_device, f"loading {stage} while {self.on_device} hold the device"
        await asyncio.sleep(0.001)
        if stage == self.fail_loading:
            self.fail_loading = None
            raise FluxmeshError(f"{stage} stage: out of memory")
        self.on_device.add(stage)
        self.events.append(f"load {stage}")
        return True


async def _request(residency: FakeStrategy, name: str, log: list[str], stages=STAGES) -> SwapCost:
    cost = SwapCost()
    for stage in stages:
        async with residency.use(stage, cost):
            assert residency.on_device == {stage}
            log.append(f"{name} {stage}")
            await asyncio.sleep(0.005)
    return cost


async def test_a_burst_costs_three_swaps_not_three_per_request():
    residency, log = FakeStrategy(), []
    costs = await asyncio.gather(*(_request(residency, f"r{i}", log) for i in range(4)))
    assert residency.events == ["load encoder", "load denoiser", "load vae"]
    assert residency.swaps == 3 and all(c.swaps == 3 and c.seconds > 0 for c in costs)
    # Phase by phase: every encode, then every denoise, then every decode.
    assert [entry.split()[1] for entry in log] == ["encoder"] * 4 + ["denoiser"] * 4 + ["vae"] * 4


async def test_newer_requests_do_not_hold_the_stage_older_ones_wait_behind():
    """While the encoder is loaded, a prompt arriving after an older request started waiting for
    the denoiser joins the next group instead of keeping the encoder loaded (no starvation)."""
    residency, log = FakeStrategy(), []
    first = asyncio.ensure_future(_request(residency, "old", log))
    while "old encoder" not in log:
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)  # "old" now waits for the denoiser
    late = asyncio.ensure_future(_request(residency, "new", log))
    await asyncio.gather(first, late)
    assert log.index("old denoiser") < log.index("new encoder")
    assert log.index("old vae") < log.index("new encoder")  # the older request finishes its round
    assert residency.events == [
        "load encoder",
        "load denoiser",
        "load vae",
        "load encoder",
        "load denoiser",
        "load vae",
    ]


async def test_one_request_waiting_for_two_stages_at_once_gets_both_in_turn():
    """Image-to-image encodes the prompt (encoder) and the init image (vae) together."""
    residency, log = FakeStrategy(), []

    async def edit(name: str) -> SwapCost:
        cost = SwapCost()

        async def use(stage: str) -> None:
            async with residency.use(stage, cost):
                log.append(f"{name} {stage}")
                await asyncio.sleep(0.005)

        await asyncio.wait_for(asyncio.gather(use("encoder"), use("vae")), 5)
        await use("denoiser")
        await use("vae")
        return cost

    costs = await asyncio.gather(edit("a"), edit("b"))
    assert sorted(log) == sorted(
        ["a encoder", "a vae", "a denoiser", "a vae", "b encoder", "b vae", "b denoiser", "b vae"]
    )
    assert residency.events == ["load encoder", "load vae", "load denoiser", "load vae"]  # one round each
    assert all(c.swaps == 4 for c in costs)


async def test_failed_swap_fails_its_waiters_and_the_next_request_recovers():
    residency, log = FakeStrategy(fail_loading="denoiser"), []
    with pytest.raises(FluxmeshError, match="out of memory"):
        await _request(residency, "unlucky", log)
    cost = await _request(residency, "next", log)
    assert cost.swaps == 3 and log[-3:] == ["next encoder", "next denoiser", "next vae"]


async def test_only_a_not_resident_reason_makes_the_strategy_forget_what_is_loaded():
    """A stage that restarted answers NOT_RESIDENT (a status detail): the next request loads it
    again. Another FAILED_PRECONDITION, whatever its words, changes nothing."""
    from fluxmesh.rpc.errors import NOT_RESIDENT, FailedPrecondition

    residency, log = FakeStrategy(), []
    await _request(residency, "first", log, stages=("encoder",))
    assert residency.loaded == "encoder"
    with pytest.raises(FailedPrecondition):
        async with residency.use("encoder"):
            raise FailedPrecondition("encoder stage: Residency is fine, this is another precondition")
    assert residency.loaded == "encoder"
    with pytest.raises(FluxmeshError):
        async with residency.use("encoder"):
            raise FluxmeshError(
                "encoder stage: weights are released", code=grpc.StatusCode.FAILED_PRECONDITION, reason=NOT_RESIDENT
            )
    assert residency.loaded is None


async def test_a_request_that_gives_up_waiting_leaves_no_trace():
    residency, log = FakeStrategy(), []
    holder = asyncio.ensure_future(_request(residency, "a", log, stages=("encoder",)))
    waiting = asyncio.ensure_future(_request(residency, "b", log, stages=("vae",)))
    await asyncio.sleep(0.002)
    waiting.cancel()
    await holder
    assert waiting.cancelled() or isinstance(waiting.exception(), asyncio.CancelledError)
    cost = await _request(residency, "c", log)
    assert cost.swaps >= 2 and "b vae" not in log and residency._users == 0 and not residency._waiters


def test_sequential_mode_refuses_dns_targets():
    from fluxmesh.orchestrator.stages import DenoiserClient, EncoderClient, VaeClient
    from fluxmesh.rpc.errors import InvalidArgument

    async def build():
        stages = [
            EncoderClient("localhost:1"),
            DenoiserClient("dns:///denoiser.example:50052"),
            VaeClient("localhost:2"),
        ]
        with pytest.raises(InvalidArgument, match="denoiser: dns:///"):
            SequentialStrategy(stages)

    asyncio.run(build())


# --------------------------------------------------------------------------- four real processes


_TOKEN: dict[str, str] = {}  # set by the sequential_up fixture


def _metadata():
    return stage_metadata(_TOKEN["stage"])


def _status(address: str) -> residency_pb2.ResidencyStatus:
    with grpc.insecure_channel(address) as channel:
        return residency_pb2_grpc.ResidencyStub(channel).Status(
            residency_pb2.ResidencyStatusRequest(), timeout=10, metadata=_metadata()
        )


def _residency(address: str, method: str, request) -> residency_pb2.ResidencyStatus:
    with grpc.insecure_channel(address) as channel:
        return getattr(residency_pb2_grpc.ResidencyStub(channel), method)(request, timeout=60, metadata=_metadata())


@pytest.fixture(scope="module")
def sequential_up(tmp_path_factory):
    """`fluxmesh up --sequential` on the small model, plus a resident-mode orchestrator on the
    same three stage processes (for the comparison)."""
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    model = write_tiny_model(tmp_path_factory.mktemp("models") / "small", size="small")
    port = free_port()
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "up",
            "--model",
            str(model),
            "--port",
            str(port),
            "--threads",
            "1",
            "--sequential",
            # these tests count swaps per request: every request must reach the encoder
            "--prompt-cache-mib",
            "0",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    resident = None
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=180, process=up)  # fluxmesh up --sequential came up
        stages = up_stages(up.pid)
        _TOKEN["stage"] = up_stage_token(up.pid)
        initial = {stage: _status(address) for stage, (_, address) in stages.items()}
        resident = Mesh(
            stages={s: stages[s][1] for s in STAGES},
            stage_token=_TOKEN["stage"],
            extra_args={"orchestrator": ["--max-active", "4"]},
        )
        # Sequential mode leaves weights released: this resident orchestrator is NOT_SERVING until
        # its test loads them, so it is waited for as a process that answers, not for SERVING.
        resident.start("orchestrator")
        resident.wait_answering(timeout=120)
        yield {
            "sequential": f"127.0.0.1:{port}",
            "resident": resident.address,
            "stages": stages,
            "initial": initial,
            "model": model,
        }
    finally:
        if resident is not None:
            resident.stop()
        up.terminate()
        up.wait(60)


def _burst(address: str, seeds, size: int, steps: int):
    def one(seed):
        with Client(address, timeout=300) as client:
            return client.generate(PROMPT, width=size, height=size, steps=steps, seed=seed)

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(one, seeds))


def _holding(status: residency_pb2.ResidencyStatus, since: float) -> list[tuple[float, float]]:
    """When the stage held weights on its device, from its own log: from the start of a load
    until the end of the release after it (open-ended if still loaded), clipped to [since, now]."""
    intervals, start = [], None
    for t in status.transitions:
        if t.to_state == "resident":
            start = t.started_unix
        elif t.from_state == "resident" and start is not None:
            intervals.append((start, t.finished_unix))
            start = None
    if start is not None:
        intervals.append((start, math.inf))
    return [(max(a, since), b) for a, b in intervals if b > since]


def test_up_sequential_starts_every_stage_released(sequential_up):
    """On CPU `up --sequential` starts the stages in standby = released: nothing loaded at once."""
    for stage, status in sequential_up["initial"].items():
        assert status.state == "released" and status.weight_bytes == 0, stage


def test_burst_of_four_costs_three_swaps_and_never_two_stages_loaded(sequential_up):
    stages = sequential_up["stages"]
    since = time.time()
    results = _burst(sequential_up["sequential"], seeds=[1, 2, 3, 4], size=128, steps=2)
    statuses = {stage: _status(address) for stage, (_, address) in stages.items()}

    loads = [
        t for s in statuses.values() for t in s.transitions if t.to_state == "resident" and t.started_unix >= since
    ]
    assert len(loads) == 3, [(t.from_state, t.to_state) for t in loads]
    assert all(r.timings.swaps == 3 and r.timings.swap > 0 for r in results)
    held = {stage: _holding(status, since) for stage, status in statuses.items()}
    for a in STAGES:
        for b in STAGES:
            if a < b:
                for s1, e1 in held[a]:
                    for s2, e2 in held[b]:
                        assert max(s1, s2) >= min(e1, e2), f"{a} and {b} both held weights at {max(s1, s2)}"
    # The stages say the same in Info: only the VAE (the last phase) holds weights now.
    with Client(sequential_up["sequential"]) as client:
        info = {s.stage: s for s in client.info().stages}
    assert {s: i.residency for s, i in info.items()} == {
        "encoder": "released",
        "denoiser": "released",
        "vae": "resident",
    }
    assert info["encoder"].weight_bytes == 0 and info["vae"].weight_bytes > 0


def test_a_released_stage_refuses_model_calls_and_keeps_serving(sequential_up):
    _, address = sequential_up["stages"]["encoder"]
    assert _status(address).state == "released"
    with grpc.insecure_channel(address) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            encoder_pb2_grpc.TextEncoderStub(channel).Encode(
                encoder_pb2.EncodeRequest(prompts=["a cat"]), timeout=30, metadata=_metadata()
            )
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "released" in caught.value.details() and "Residency/Load" in caught.value.details()
    assert reason_of(caught.value) == NOT_RESIDENT  # what the orchestrator reads, not the words
    assert health_status(address) == SERVING


def test_sequential_lowers_peak_rss_and_keeps_the_pixels(sequential_up):
    """Whole-system peak RSS of the three stage processes, sampled every 5 ms during a burst of 4
    at 256x256: resident mode first (all three loaded, warmed up), then sequential mode (warmed
    up). Resident first is the order that favours resident: whatever the allocator kept from it
    still counts against sequential."""
    import psutil

    stages = sequential_up["stages"]
    processes = [psutil.Process(pid) for pid, _ in stages.values()]

    def peak_rss(address: str, seeds):
        peak, done = [0], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in processes))
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            results = _burst(address, seeds, size=256, steps=3)
        finally:
            done.set()
            sampler.join()
        return peak[0], results

    for _, address in stages.values():  # resident mode: every stage loaded, as one GPU each would be
        _residency(address, "Load", residency_pb2.LoadRequest())
    _burst(sequential_up["resident"], [9], size=256, steps=3)
    resident_peak, resident = peak_rss(sequential_up["resident"], [11, 12, 13, 14])
    _burst(sequential_up["sequential"], [9], size=256, steps=3)  # the first swap releases the others
    sequential_peak, sequential = peak_rss(sequential_up["sequential"], [11, 12, 13, 14])

    print(
        f"peak RSS of the stages: resident {resident_peak / 2**20:.0f} MiB, "
        f"sequential {sequential_peak / 2**20:.0f} MiB"
    )
    assert sequential_peak < resident_peak
    # The denoiser batches a burst step by step, and the two modes group the same four requests
    # differently (resident: as they arrive; sequential: as one phase), so the promise is the
    # batching one: each image within 1/255 of the other mode's.
    assert [max_abs_diff(s.image, r.image) for s, r in zip(sequential, resident)] <= [1] * len(resident)
    assert all(r.timings.swaps == 0 for r in resident) and all(r.timings.swaps == 3 for r in sequential)


def test_true_cfg_in_sequential_mode_keeps_the_pixels_and_three_swaps(sequential_up):
    """The negative prompt is encoded in the same encoder turn: still three swaps, same image."""
    options = dict(width=64, height=64, steps=2, seed=5, negative_prompt="blurry", true_cfg_scale=3.0)
    for _, address in sequential_up["stages"].values():  # the resident orchestrator loads nothing itself
        _residency(address, "Load", residency_pb2.LoadRequest())
    with Client(sequential_up["resident"], timeout=300) as client:
        resident = client.generate(PROMPT, **options)
    with Client(sequential_up["sequential"], timeout=300) as client:
        sequential = client.generate(PROMPT, **options)
    assert sequential.timings.swaps == 3  # the first releases the two others; both encodes share one turn
    assert sequential.image_data == resident.image_data


def test_the_prompt_cache_skips_the_encoder_and_its_swap_on_a_repeated_burst(sequential_up):
    """A sequential orchestrator with the prompt cache on (its default) on the same stages: a
    burst of one prompt encodes it once; a second burst of it never loads the encoder (two swaps,
    not three) and keeps diffusers' pixels."""
    from factories import max_abs_diff, reference_images

    stages = sequential_up["stages"]
    cached = Mesh(
        stages={s: stages[s][1] for s in STAGES},
        stage_token=_TOKEN["stage"],
        extra_args={"orchestrator": ["--sequential"]},
    )
    cached.start("orchestrator")
    prompt = "a paper boat on a pond, repeated"

    def burst(seeds):
        def one(seed):
            with Client(cached.address, timeout=300) as client:
                return client.generate(prompt, width=64, height=64, steps=2, seed=seed)

        with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
            return list(pool.map(one, seeds))

    def encoder_requests() -> int:
        with Client(cached.address) as client:
            return int(next(s for s in client.info().stages if s.stage == "encoder").details["requests"])

    try:
        cached.wait_health(SERVING, timeout=120)
        before = encoder_requests()
        first = burst([21, 22, 23, 24])
        assert encoder_requests() == before + 1  # one encoder call for the four
        assert sorted(r.timings.cached_encodes for r in first) == [0, 1, 1, 1]
        again = burst([25, 26, 27, 28])
        assert encoder_requests() == before + 1
        assert all(r.timings.cached_encodes == 1 and r.timings.swaps == 2 for r in again), [
            r.timings.swaps for r in again
        ]
    finally:
        cached.stop()
    expected = reference_images(
        sequential_up["model"], prompt=prompt, width=64, height=64, steps=2, guidance=3.5, seed=25
    )[0]
    assert max_abs_diff(again[0].image, expected) <= 1
