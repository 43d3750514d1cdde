"""A mesh that gets broken on purpose: start order, killed clients and stages, deadlines, drains;
and what it reports meanwhile (Prometheus metrics, one request id through four processes' logs).

The module runs its own four processes (never the shared session clusters). Tests run in file
order: the observability checks first, then the faults, the drains last.
Runtime: about 70 s on two cores (three stage restarts and one orchestrator drain included).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import grpc
import pytest

from factories import PROMPT
from fluxmesh.cli.supervisor import STAGES
from fluxmesh.client import Client, FluxmeshError, Result, Stage, StageStarted, Step
from fluxmesh.rpc.channels import sync_channel
from fluxmesh.v1 import common_pb2, generator_pb2
from mesh import NOT_SERVING, SERVING, Mesh, metric, wait_settled, wait_until
from rpc_tools import call


@pytest.fixture(scope="module")
def mesh(dev_model, tmp_path_factory):
    """Started the awkward way round: orchestrator first, then vae, denoiser, encoder."""
    mesh = Mesh(dev_model, tmp_path_factory.mktemp("mesh-logs"))
    mesh.start_order_health = []
    try:
        mesh.start("orchestrator")
        mesh.wait_health(NOT_SERVING, timeout=60)
        for stage in reversed(STAGES):
            mesh.start(stage)
            mesh.wait_health(SERVING, stage, timeout=180)
            if stage != STAGES[0]:  # once the orchestrator's monitor saw it: must still say NOT_SERVING
                wait_until(lambda stage=stage: mesh.monitor_saw(stage), what=f"the orchestrator sees the {stage}")
                mesh.start_order_health.append((stage, mesh.health()))
        # the last stage came: SERVING by itself within the channel's 2 s reconnect backoff
        mesh.start_order_health.append((STAGES[0], SERVING if mesh.wait_health(SERVING, timeout=10) < 10 else None))
        yield mesh
    finally:
        mesh.stop()


def _denoiser_steps(mesh: Mesh) -> int:
    with sync_channel(mesh.address_of("denoiser")) as channel:
        _, _, [raw] = call(
            channel, "/fluxmesh.v1.Denoiser/Info", common_pb2.InfoRequest(), timeout=5, metadata=mesh.stage_metadata()
        )
    return int(common_pb2.StageInfo.FromString(raw).details["steps_run"])


def _wait_steps_settle(mesh: Mesh, quiet: float = 1.0, timeout: float = 15.0) -> int:
    """The denoiser's step count once it stopped moving for `quiet` seconds."""
    return wait_settled(lambda: _denoiser_steps(mesh), quiet=quiet, timeout=timeout, what="the denoiser's steps")


def test_stages_may_start_in_any_order(mesh):
    # NOT_SERVING while any stage is missing, SERVING once the last one came, without a restart
    assert mesh.start_order_health == [("vae", NOT_SERVING), ("denoiser", NOT_SERVING), ("encoder", SERVING)]
    with Client(mesh.address, timeout=60) as client:
        assert client.generate(PROMPT, width=64, height=64, steps=1, seed=1).image.size == (64, 64)


def test_one_request_id_in_every_process_log(mesh):
    with sync_channel(mesh.address) as channel:
        code, details, events = call(
            channel,
            "/fluxmesh.v1.Generator/Generate",
            # a prompt of its own: one the prompt cache holds would skip the encoder
            generator_pb2.GenerateRequest(prompt=f"{PROMPT}, traced", width=64, height=64, steps=2, seed=3),
            metadata=(("x-request-id", "trace-me-7"),),
            timeout=60,
        )
    assert code == grpc.StatusCode.OK, details
    assert generator_pb2.GenerateEvent.FromString(events[-1]).request_id == "trace-me-7"

    def logged() -> bool:  # log lines may follow the reply
        mine = [line for line in mesh.log("orchestrator").splitlines() if "[trace-me-7]" in line]
        every = all("trace-me-7" in mesh.log(name) for name in STAGES)
        return every and any("Generate OK" in line for line in mine) and any("done in" in line for line in mine)

    wait_until(logged, 30, what="every process logged the request")
    for name in (*STAGES, "orchestrator"):
        lines = [line for line in mesh.log(name).splitlines() if "trace-me-7" in line]
        assert lines, f"no log line of {name} names the request"
        assert all("[trace-me-7]" in line for line in lines), lines  # the id is a field, not just text
    orchestrator = [line for line in mesh.log("orchestrator").splitlines() if "[trace-me-7]" in line]
    assert any("Generate OK" in line for line in orchestrator) and any("done in" in line for line in orchestrator)


def test_metrics_report_queue_stages_speed_errors_and_memory(mesh):
    with Client(mesh.address, timeout=60) as client:
        client.generate(PROMPT, width=64, height=64, steps=3, seed=4)
        with pytest.raises(FluxmeshError):
            client.generate(PROMPT, width=65, height=64, steps=1)
    orchestrator = mesh.metrics("orchestrator")
    assert metric(orchestrator, "fluxmesh_queue_depth") == 0
    assert metric(orchestrator, "fluxmesh_queue_limit") == 32
    for stage in ("encode", "denoise", "decode"):
        assert metric(orchestrator, "fluxmesh_stage_seconds_count", stage=stage) >= 1
    assert metric(orchestrator, "fluxmesh_denoise_steps_per_second") > 0
    assert metric(orchestrator, "fluxmesh_rpc_handled_total", method="Generate", code="OK") >= 1
    assert metric(orchestrator, "fluxmesh_rpc_handled_total", method="Generate", code="INVALID_ARGUMENT") >= 1
    assert metric(orchestrator, "process_resident_memory_bytes") > 0
    denoiser = mesh.metrics("denoiser")
    assert metric(denoiser, "fluxmesh_denoiser_steps_total") >= 3
    assert metric(denoiser, "fluxmesh_denoiser_steps_per_second") > 0
    assert metric(denoiser, "fluxmesh_denoiser_step_seconds_count") >= 3
    assert metric(denoiser, "fluxmesh_rpc_handled_total", method="Denoise", code="OK") >= 1
    for stage in STAGES:
        text = mesh.metrics(stage)
        assert metric(text, "fluxmesh_stage_weight_bytes", stage=stage) > 0
        assert metric(text, "process_resident_memory_bytes") > 0


CLIENT_SCRIPT = """
import sys
from fluxmesh.client import Client, Step
with Client(sys.argv[1], timeout=300) as client:
    for event in client.stream("a red fox", width=256, height=256, steps=100, seed=5):
        if isinstance(event, Step):
            print(event.step, flush=True)
"""


def test_a_client_killed_mid_denoise_stops_the_denoiser_within_a_step(mesh):
    before = _wait_steps_settle(mesh)
    client = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CLIENT_SCRIPT), mesh.address],
        stdout=subprocess.PIPE,
        text=True,
    )
    seen = int(client.stdout.readline())
    client.kill()  # no goodbye: the connection just drops
    client.wait()
    ran = _wait_steps_settle(mesh) - before
    # it saw `seen` steps; a step or two more were under way when the connection dropped
    assert seen <= ran <= seen + 2, (seen, ran)
    with Client(mesh.address, timeout=60) as alive:  # and the slot is free again
        assert alive.generate(PROMPT, width=64, height=64, steps=1, seed=1).image.size == (64, 64)


def test_a_deadline_that_runs_out_mid_denoise_stops_the_denoiser(mesh):
    before = _wait_steps_settle(mesh)
    started = time.monotonic()
    with Client(mesh.address) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=512, height=512, steps=100, seed=6, timeout=1.5)  # ~5 s of work
    assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - started < 1.5 + 1.0
    ran = _wait_steps_settle(mesh) - before
    assert 1 <= ran < 100, ran  # stopped by its own deadline, long before the end


def _kill_mid_request(mesh: Mesh, stage: str) -> tuple[FluxmeshError, float, float]:
    """Start a request, SIGKILL `stage` while the request is in its hands; returns the error, the
    seconds from kill to error, and the seconds the whole request took."""
    occupied = False
    if stage != "denoiser":
        # Encode and decode take milliseconds on the tiny model: freeze the stage first so the
        # orchestrator's call is certainly in flight there when the stage dies.
        mesh.process(stage).send_signal(signal.SIGSTOP)
        occupied = True
    target = {"encoder": Stage.encode, "denoiser": Stage.denoise, "vae": Stage.decode}[stage]
    started = time.monotonic()
    killed_at = None
    with Client(mesh.address, timeout=60) as client:
        try:
            for event in client.stream(PROMPT, width=256, height=256, steps=100 if stage == "denoiser" else 2, seed=7):
                in_stage = isinstance(event, StageStarted) and event.stage == target and occupied
                if killed_at is None and (in_stage or (isinstance(event, Step) and stage == "denoiser")):
                    if occupied:
                        # Not a wait on anything observable: a stopped process answers nothing, so
                        # the orchestrator's call gets this long to reach the frozen stage.
                        time.sleep(0.3)
                    mesh.process(stage).kill()
                    killed_at = time.monotonic()
                assert not isinstance(event, Result), f"{stage} was killed, yet the request finished"
        except FluxmeshError as error:
            assert killed_at is not None, error
            now = time.monotonic()
            return error, now - killed_at, now - started
    raise AssertionError("the request ended without an error")


@pytest.mark.parametrize("stage", STAGES)
def test_sigkill_of_a_stage_mid_request_is_unavailable_naming_it_and_heals_itself(mesh, stage):
    error, after_kill, total = _kill_mid_request(mesh, stage)
    assert error.code == grpc.StatusCode.UNAVAILABLE
    assert error.message.startswith(f"{stage} stage unavailable: {mesh.address_of(stage)}"), error.message
    assert after_kill < 5.0 and total < 60  # at once, well within the request's 60 s deadline
    mesh.process(stage).wait(timeout=10)
    mesh.wait_health(NOT_SERVING, timeout=10)  # honest about what it depends on ...
    assert mesh.process("orchestrator").poll() is None  # ... and still up
    mesh.start(stage)  # the same port, as a process manager would restart it
    mesh.wait_health(SERVING, stage, timeout=180)
    mesh.wait_health(SERVING, timeout=30)  # by itself: nobody touched the orchestrator
    with Client(mesh.address, timeout=60) as client:
        assert client.generate(PROMPT, width=64, height=64, steps=2, seed=8).image.size == (64, 64)


def _watch_health(address: str) -> tuple[grpc.Channel, object]:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = sync_channel(address)
    return channel, health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(), timeout=60)


@pytest.mark.parametrize("name", ["denoiser", "orchestrator"])
def test_sigterm_drains_an_in_flight_request_then_exits_0(mesh, name):
    """Health goes NOT_SERVING (watchers are told, then let go), new calls are refused, the
    request in flight completes, and the process exits 0 well inside the 30 s grace period."""
    channel, watch = _watch_health(mesh.address_of(name))
    assert next(watch).status == SERVING
    with Client(mesh.address, timeout=120) as client:
        stream = client.stream(PROMPT, width=512, height=512, steps=40, seed=9)  # ~2 s of work
        events = iter(stream)
        while not isinstance(next(events), Step):
            pass
        process = mesh.process(name)
        signalled = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert next(watch).status == NOT_SERVING
        assert list(watch) == []  # the watch stream ended: it does not hold the drain
        refused = _new_call_status(mesh, name)
        result = [event for event in events if isinstance(event, Result)]
    assert refused == grpc.StatusCode.UNAVAILABLE
    assert len(result) == 1 and result[0].image.size == (512, 512)
    assert process.wait(timeout=30) == 0
    assert time.monotonic() - signalled < 20
    channel.close()
    mesh.start(name)
    mesh.wait_health(SERVING, name, timeout=180)
    mesh.wait_health(SERVING, timeout=30)


def _new_call_status(mesh: Mesh, name: str) -> grpc.StatusCode:
    """A new call to a draining process, on a fresh connection."""
    method = {"denoiser": "/fluxmesh.v1.Denoiser/Info", "orchestrator": "/fluxmesh.v1.Generator/Info"}[name]
    with sync_channel(mesh.address_of(name)) as channel:
        code, _, _ = call(channel, method, common_pb2.InfoRequest(), timeout=5, metadata=mesh.stage_metadata())
    return code
