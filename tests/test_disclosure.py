"""What one tenant of a shared orchestrator learns of the others and of the server (issue 10,
item 19): with an ordinary client token, ListLoras leaves out `cached` (what others used
lately), Info leaves out paths, counters and memory, and a server fault says its code, the stage
and a request id (the full message is in the log under that id). The admin token sees all.

One orchestrator with two tenant tokens and an admin token, in front of real stage processes
(tiny model, a LoRA directory), serves the module.
"""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from fluxmesh.cli.supervisor import free_port
from fluxmesh.client import Client
from fluxmesh.rpc.errors import FluxmeshError
from fluxmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc
from lora_fixtures import write_lora
from mesh import Mesh, wait_until

TENANT, OTHER, ADMIN = "tenant-token-one", "tenant-token-two", "admin-token-of-the-operator"
SMALL = {"width": 64, "height": 64, "steps": 1, "seed": 3}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("disclosure")
    (root / "tokens").write_text(f"{TENANT}\n{OTHER}\n")
    (root / "admin-tokens").write_text(f"{ADMIN}\n")
    (root / "logs").mkdir()
    return root


def _tokens(folder: Path) -> list[str]:
    return ["--token-file", str(folder / "tokens"), "--admin-token-file", str(folder / "admin-tokens")]


@pytest.fixture(scope="module")
def shared(dev_model, dev_cluster, folder):
    """Two tenants and an admin on one orchestrator, in front of an encoder and a denoiser with a
    LoRA directory (and the session cluster's vae: one process fewer to start)."""
    write_lora("peft", folder / "loras" / "style.safetensors", dev_model, seed=1)
    lora_dir = ["--lora-dir", str(folder / "loras")]
    extra = {"encoder": lora_dir, "denoiser": lora_dir, "orchestrator": _tokens(folder)}
    vae = {"vae": dev_cluster.address_of("vae")}
    with Mesh(dev_model, folder / "logs", stages=vae, stage_token=dev_cluster.stage_token, extra_args=extra) as mesh:
        yield mesh.start_all()


def _info(address: str, token: str) -> generator_pb2.GeneratorInfo:
    with grpc.insecure_channel(address) as channel:
        return generator_pb2_grpc.GeneratorStub(channel).Info(
            common_pb2.InfoRequest(), timeout=30, metadata=(("authorization", f"Bearer {token}"),)
        )


def test_a_tenant_does_not_see_which_loras_others_used(shared):
    with Client(shared.address, token=OTHER, timeout=120) as other:
        other.generate("a lighthouse", loras=[("style", 0.8)], **SMALL)  # now read and converted: cached
    with Client(shared.address, token=TENANT) as tenant, Client(shared.address, token=ADMIN) as admin:
        seen_by_tenant, seen_by_admin = tenant.list_loras(), admin.list_loras()
    assert [(lora.name, lora.cached) for lora in seen_by_tenant] == [("style", False)]
    assert [(lora.name, lora.cached) for lora in seen_by_admin] == [("style", True)]
    assert seen_by_tenant[0].size_bytes == seen_by_admin[0].size_bytes > 0  # the catalogue itself stays


def test_a_tenants_info_holds_no_paths_counters_or_memory(shared, dev_model):
    tenant, admin = _info(shared.address, TENANT), _info(shared.address, ADMIN)
    assert str(dev_model).encode() not in tenant.SerializeToString()  # no server path anywhere
    for stage in tenant.stages:
        assert stage.model == dev_model.name, stage
        assert (dict(stage.details), stage.weight_bytes, stage.peak_memory_bytes, stage.residency) == ({}, 0, 0, "")
        assert stage.identity == ""
    # The model's facts, which clients need, are the same for both.
    assert (tenant.size_multiple, tenant.guidance_embeds) == (admin.size_multiple, admin.guidance_embeds)
    assert [s.stage for s in tenant.stages] == [s.stage for s in admin.stages]
    # The admin sees everything, as before.
    for stage in admin.stages:
        assert stage.model == str(dev_model) and stage.weight_bytes > 0 and "requests" in stage.details, stage


@pytest.fixture(scope="module")
def vae_down(shared, folder):
    """A second orchestrator with the same tokens whose vae address has nobody listening: every
    generation fails at decode, a server fault naming an internal address."""
    stages = {stage: shared.address_of(stage) for stage in ("encoder", "denoiser")}
    stages["vae"] = f"127.0.0.1:{free_port()}"
    extra = {"orchestrator-down": _tokens(folder)}
    with Mesh(stages=stages, stage_token=shared.stage_token, logs=folder / "logs", extra_args=extra) as mesh:
        mesh.start("orchestrator-down")
        mesh.wait_answering("orchestrator-down")  # NOT_SERVING: its vae is missing
        yield mesh, stages["vae"]


def _fault(address: str, token: str) -> FluxmeshError:
    with Client(address, token=token, timeout=120) as client, pytest.raises(FluxmeshError) as caught:
        client.generate("a lighthouse", **SMALL)
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE, caught.value
    return caught.value


def test_a_tenant_hears_a_server_fault_as_its_stage_and_a_request_id(vae_down):
    mesh, vae_address = vae_down
    address = mesh.address_of("orchestrator-down")
    tenant = _fault(address, TENANT)
    quoted = re.fullmatch(r"vae stage is unavailable; quote request id (\S+) to its operator .*", tenant.message)
    assert quoted, tenant.message
    assert vae_address not in tenant.message and "127.0.0.1" not in tenant.message
    # The operator finds the full message by the id the tenant quotes.
    wait_until(
        lambda: any(quoted[1] in line and vae_address in line for line in mesh.log("orchestrator-down").splitlines()),
        10,
        what=f"a log line naming {quoted[1]} and {vae_address}",
    )

    admin = _fault(address, ADMIN)
    assert admin.message.startswith(f"vae stage unavailable: {vae_address}"), admin.message


def test_tenant_errors_about_their_own_input_stay_whole(shared):
    """Only server faults are hidden: a tenant's own mistake still names the field and the value."""
    with Client(shared.address, token=TENANT) as tenant, pytest.raises(FluxmeshError) as caught:
        tenant.generate("a lighthouse", loras=[("no-such-lora", 0.5)], **SMALL)
    assert caught.value.code == grpc.StatusCode.NOT_FOUND
    assert "no LoRA named 'no-such-lora'" in caught.value.message, caught.value


@pytest.mark.parametrize("command", [["serve", "orchestrator"], ["up", "--model", "unused"]])
def test_the_admin_token_comes_from_a_file_or_a_variable(command):
    """`serve orchestrator` and `up` take it as every token is taken (argv is public): an unset
    variable is one line and exit 2, before anything starts."""
    from typer.testing import CliRunner

    from fluxmesh.cli.main import app

    result = CliRunner().invoke(app, [*command, "--admin-token-env", "FLUXMESH_NO_SUCH_VARIABLE"])
    assert result.exit_code == 2 and "FLUXMESH_NO_SUCH_VARIABLE is unset or empty" in result.output, result.output
