"""Several replicas of a stage: requests spread over them, a replica that goes away is skipped.

End to end: two denoiser processes behind one orchestrator (`--denoiser A,B`), sharing the
session cluster's encoder and VAE. The replica-picking rules are also checked alone.
"""

from __future__ import annotations

import concurrent.futures
import json
import math
import signal
import time

import grpc
import pytest

from fluxmesh.client import Client, FluxmeshError
from fluxmesh.orchestrator.replicas import Replica, ReplicaSet, channel_options, parse_targets
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import common_pb2, denoiser_pb2_grpc
from mesh import SERVING, Mesh, wait_until

PROMPT = "two foxes in the snow"


# --------------------------------------------------------------------------- picking, alone


def _set(n: int) -> ReplicaSet:
    return ReplicaSet("denoiser", [Replica(f"host{i}:1", channel=None) for i in range(n)])


def test_parse_targets():
    assert parse_targets("a:1") == ["a:1"]
    assert parse_targets(" a:1, b:2 ") == ["a:1", "b:2"]
    assert parse_targets("dns:///denoiser.fluxmesh.svc:50052") == ["dns:///denoiser.fluxmesh.svc:50052"]
    for bad in ("", "a:1,,b:2", "a:1,a:1"):
        with pytest.raises(InvalidArgument, match="INVALID_ARGUMENT: denoiser: "):
            parse_targets(bad, "denoiser")


def test_dns_targets_get_round_robin_and_retries():
    config = json.loads(dict(channel_options("dns:///denoiser:50052"))["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    retried = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("fluxmesh.v1.TextEncoder", "Encode") in retried and ("fluxmesh.v1.Vae", "Decode") in retried
    assert not any(method == "Denoise" for _, method in retried)  # streamed progress is never replayed
    plain = json.loads(dict(channel_options("gpu1:50052"))["grpc.service_config"])
    assert "methodConfig" not in plain


def test_pick_spreads_by_calls_in_flight_and_rotates_ties():
    replicas = _set(3)
    picked = []
    for _ in range(3):
        replica = replicas.pick()
        replica.in_flight += 1
        picked.append(replica.target)
    assert sorted(picked) == ["host0:1", "host1:1", "host2:1"]
    replicas.replicas[1].in_flight = 0
    assert replicas.pick().target == "host1:1"  # the idle one, whatever the rotation says
    for r in replicas.replicas:
        r.in_flight = 0
    assert [replicas.pick().target for _ in range(4)] == ["host2:1", "host0:1", "host1:1", "host2:1"]


def test_pick_skips_down_replicas_but_never_refuses_to_try():
    replicas = _set(2)
    down, up = replicas.replicas
    replicas.set_health(down, False)
    assert {replicas.pick().target for _ in range(4)} == {up.target}
    assert replicas.pick(tried=[up]) is down  # nothing else left: try it (the caller gets the real error)
    replicas.set_health(down, True)
    assert {replicas.pick().target for _ in range(4)} == {"host0:1", "host1:1"}
    down.down_until = time.monotonic() + 60  # failed a call: skipped for a while even without a health check
    assert replicas.pick() is up and not math.isinf(down.down_until)


async def test_a_dns_target_reaches_the_stage_through_round_robin(stage_addresses, stage_token):
    """`dns:///localhost:PORT` resolves to ::1 and 127.0.0.1; the stage listens on the latter
    only, and round_robin skips the address that refuses."""
    from fluxmesh.orchestrator.stages import VaeClient
    from fluxmesh.rpc.security import ClientSecurity

    port = stage_addresses["vae"].rpartition(":")[2]
    client = VaeClient(f"dns:///localhost:{port}", security=ClientSecurity(token=stage_token))
    try:
        assert (await client.info(timeout=30)).stage == "vae"
    finally:
        await client.close()


# --------------------------------------------------------------------------- two real denoisers


def _denoiser_requests(cluster: Mesh, address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        info = denoiser_pb2_grpc.DenoiserStub(channel).Info(
            common_pb2.InfoRequest(), timeout=10, metadata=cluster.stage_metadata()
        )
    return int(info.details["requests"])


REPLICAS = ("denoiser-a", "denoiser-b")


def _replica_up(cluster: Mesh, address: str) -> bool:
    """Whether the orchestrator's monitor last saw the replica at `address` up (it logs changes)."""
    log = cluster.log("orchestrator")
    return log.rfind(f"denoiser replica {address} is down") <= log.rfind(f"denoiser replica {address} is SERVING")


@pytest.fixture(scope="module")
def two_denoisers(dev_model, stage_addresses, stage_token):
    shared = {stage: stage_addresses[stage] for stage in ("encoder", "vae")}  # they demand stage_token
    cluster = Mesh(
        dev_model, stages=shared, stage_token=stage_token, extra_args={"orchestrator": ["--max-active", "8"]}
    )
    denoisers = [cluster.address_of(name) for name in REPLICAS]
    cluster.stages["denoiser"] = ",".join(denoisers)
    with cluster:
        # SERVING once one replica is; the monitor logs each replica it saw down, then up again
        cluster.start_all(*REPLICAS, "orchestrator")
        wait_until(lambda: all(_replica_up(cluster, address) for address in denoisers), what="both replicas seen")
        yield cluster, denoisers


def _burst(address: str, seeds, steps: int):
    def one(seed):
        try:
            with Client(address, timeout=120) as client:
                return client.generate(PROMPT, width=64, height=64, steps=steps, seed=seed)
        except FluxmeshError as error:
            return error

    with concurrent.futures.ThreadPoolExecutor(len(seeds)) as pool:
        return list(pool.map(one, seeds))


def test_both_replicas_receive_work_under_a_burst(two_denoisers):
    cluster, denoisers = two_denoisers
    before = [_denoiser_requests(cluster, a) for a in denoisers]
    results = _burst(cluster.address, range(8), steps=4)
    assert not [r for r in results if isinstance(r, Exception)]
    gained = [_denoiser_requests(cluster, a) - b for a, b in zip(denoisers, before)]
    assert sum(gained) == 8 and min(gained) >= 2, gained  # spread by calls in flight, not all on one


def test_killing_a_replica_mid_burst_loses_only_what_it_was_computing(two_denoisers):
    """SIGKILL one replica while a burst runs. Requests queued on it that had not started are
    re-run on the other one; at most the one it was stepping through (its progress already
    streamed to the client) fails, with UNAVAILABLE naming the denoiser and the dead address.
    Afterwards the dead replica is skipped: everything succeeds, and the orchestrator stays
    SERVING because a replica of every stage is."""
    cluster, denoisers = two_denoisers
    victim = cluster.process("denoiser-a")
    started = _denoiser_requests(cluster, denoisers[0])
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(_burst, cluster.address, range(100, 110), 40)
        wait_until(lambda: _denoiser_requests(cluster, denoisers[0]) >= started + 2, 60, interval=0.02)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        results = burst.result(timeout=300)
    failures = [r for r in results if isinstance(r, Exception)]
    assert len(failures) <= 1, [str(f) for f in failures]
    for failure in failures:
        assert failure.code == grpc.StatusCode.UNAVAILABLE
        assert "denoiser" in failure.message and denoisers[0] in failure.message

    after = _burst(cluster.address, range(200, 206), steps=2)
    assert not [r for r in after if isinstance(r, Exception)]
    cluster.wait_monitor_rounds("denoiser-b")  # a whole monitor round since, with the victim down
    assert cluster.health() == SERVING
