"""Bad input gets INVALID_ARGUMENT naming the field, before any stage works; the service keeps serving."""

from __future__ import annotations

import math

import grpc
import pytest

from conftest import stage_metadata
from factories import PROMPT
from fluxmesh.cli.supervisor import free_port
from fluxmesh.client import Client, FluxmeshError
from fluxmesh.v1 import common_pb2
from mesh import NOT_SERVING, Mesh, wait_until

BAD_FIELDS = [
    ("width", {"width": 100}),
    ("width", {"width": 32}),
    ("width", {"width": 4096}),
    ("height", {"height": 72}),
    ("height", {"height": 2064}),
    ("steps", {"steps": 0}),
    ("steps", {"steps": 101}),
    ("guidance", {"guidance": math.nan}),
    ("guidance", {"guidance": math.inf}),
    ("num_images", {"num_images": 9}),
    ("num_images", {"num_images": -1}),
    ("max_sequence_length", {"max_sequence_length": 513}),
]


def _work_done(address: str) -> dict[str, int]:
    """Requests each stage has accepted, from the stages' own Info."""
    with Client(address) as client:
        return {stage.stage: int(stage.details["requests"]) for stage in client.info().stages}


@pytest.mark.parametrize("field,options", BAD_FIELDS, ids=[f"{f}={list(o.values())[0]}" for f, o in BAD_FIELDS])
def test_invalid_field_is_named_before_any_stage_runs(dev_cluster, field, options):
    before = _work_done(dev_cluster.address)
    with Client(dev_cluster.address, timeout=30) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, **{"width": 64, "height": 64, "steps": 2, **options})
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(f"{field}:"), caught.value.message
    assert _work_done(dev_cluster.address) == before


@pytest.mark.parametrize("prompt", ["", "   ", "x" * 20_001])
def test_empty_or_huge_prompt_is_rejected(dev_cluster, prompt):
    with Client(dev_cluster.address, timeout=30) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(prompt, width=64, height=64, steps=1)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("prompt:")


def test_service_keeps_serving_after_errors(dev_cluster):
    with Client(dev_cluster.address, timeout=60) as client:
        for _ in range(3):
            with pytest.raises(FluxmeshError):
                client.generate(PROMPT, width=65, height=64)
        result = client.generate(PROMPT, width=64, height=64, steps=1, seed=3)
    assert result.image.size == (64, 64)


def test_stage_down_is_unavailable_naming_the_stage(dev_cluster, stage_addresses, stage_token):
    """An orchestrator whose VAE address has nothing behind it: health says NOT_SERVING, a request
    fails with UNAVAILABLE naming the vae and its address, and the orchestrator keeps answering."""
    dead = f"127.0.0.1:{free_port()}"
    with Mesh(stages={**stage_addresses, "vae": dead}, stage_token=stage_token) as cluster:
        cluster.start("orchestrator")
        # One monitor round done: it saw the live stages (and so the dead one too).
        wait_until(lambda: cluster.monitor_saw("encoder") and cluster.monitor_saw("denoiser"), what="a monitor round")
        assert cluster.health() == NOT_SERVING  # it depends on a dead stage
        with Client(cluster.address, timeout=30) as client:
            for _ in range(2):
                with pytest.raises(FluxmeshError) as caught:
                    client.generate(PROMPT, width=64, height=64, steps=1, seed=1)
                assert caught.value.code == grpc.StatusCode.UNAVAILABLE
                assert "vae" in caught.value.message and dead in caught.value.message
        assert cluster.health() == NOT_SERVING  # still answering, still honest


def test_stage_rejects_mismatched_tensor_bytes(stage_addresses, stage_token):
    from fluxmesh.rpc.channels import sync_channel
    from fluxmesh.v1 import vae_pb2, vae_pb2_grpc

    with sync_channel(stage_addresses["vae"]) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        bad = common_pb2.Tensor(dtype="float32", shape=[1, 16, 64], data=b"\0" * 10)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Decode(
                vae_pb2.DecodeRequest(latents=bad, width=64, height=64),
                timeout=10,
                metadata=stage_metadata(stage_token),
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.details().startswith("latents.data:")
        bad = common_pb2.Tensor(dtype="complex64", shape=[1], data=b"\0" * 8)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Decode(
                vae_pb2.DecodeRequest(latents=bad, width=64, height=64),
                timeout=10,
                metadata=stage_metadata(stage_token),
            )
        assert caught.value.details().startswith("latents.dtype:")
