"""`fluxmesh up` gives each CPU stage its share of the host's cores; explicit --threads wins; a stage
on an accelerator keeps its CPU threads few."""

from __future__ import annotations

import grpc
import pytest

from fluxmesh.contract import Stage
from fluxmesh.rpc.cores import CPU_SHARE_ENV, cpu_shares, parse_share
from mesh import Mesh


@pytest.mark.parametrize(
    "cores, expected",
    [(1, (1, 1, 1)), (2, (1, 2, 1)), (4, (1, 4, 1)), (6, (1, 6, 1)), (16, (4, 16, 4)), (64, (16, 64, 16))],
)
def test_the_denoiser_gets_every_core_and_the_brief_stages_a_quarter(cores, expected):
    shares = cpu_shares(cores)
    assert tuple(shares[stage] for stage in (Stage.encoder, Stage.denoiser, Stage.vae)) == expected
    assert set(shares) == set(Stage)


def test_explicit_threads_win_and_accelerator_stages_keep_few():
    import torch

    from fluxmesh.services.runtime.device import (
        ACCELERATOR_STAGE_THREADS,
        Device,
        stage_threads,
    )

    cpu = Device(torch.device("cpu"), torch.float32)
    gpu = Device(torch.device("cuda", 0), torch.bfloat16)  # constructed, not used: no GPU needed
    assert stage_threads(None, cpu, None) is None  # plain `serve` on CPU: torch's default
    assert stage_threads(None, cpu, 3) == 3
    assert stage_threads(5, cpu, 3) == 5
    assert stage_threads(None, gpu, 8) == ACCELERATOR_STAGE_THREADS
    assert stage_threads(None, gpu, None) == ACCELERATOR_STAGE_THREADS
    assert stage_threads(None, gpu, 1) == 1
    assert stage_threads(6, gpu, 8) == 6
    assert [parse_share(v) for v in (None, "", "0", "-2", "x", "3")] == [None, None, None, None, None, 3]


def test_a_stage_started_with_a_share_computes_with_it(dev_model):
    """The share reaches the process through its environment (as `fluxmesh up` sets it), and the
    stage's Info reports the threads it computes with."""
    from fluxmesh.v1 import common_pb2, vae_pb2_grpc

    with Mesh(dev_model, threaded=True, env={CPU_SHARE_ENV: "1"}) as mesh:  # no --threads: the share decides
        mesh.start_all("vae")
        with grpc.insecure_channel(mesh.address_of("vae")) as channel:
            info = vae_pb2_grpc.VaeStub(channel).Info(
                common_pb2.InfoRequest(), timeout=10, metadata=mesh.stage_metadata()
            )
        assert info.details["threads"] == "1"


def test_explicit_threads_are_reported(stage_addresses, stage_token):
    from conftest import stage_metadata
    from fluxmesh.v1 import common_pb2, denoiser_pb2_grpc

    with grpc.insecure_channel(stage_addresses["denoiser"]) as channel:
        info = denoiser_pb2_grpc.DenoiserStub(channel).Info(
            common_pb2.InfoRequest(), timeout=10, metadata=stage_metadata(stage_token)
        )
    assert info.details["threads"] == "1"  # the test clusters' --threads 1
