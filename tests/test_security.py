"""TLS on every hop, mutual TLS between orchestrator and stages, bearer tokens.

The module makes its own CA and certificates (`certs.py`) and runs four processes where every
stage demands the orchestrator's client certificate *and* a stage token, and the orchestrator
serves TLS and demands a public token. Each way in without the right credentials is refused
with the right status; with them, a generation works through the SDK and through the CLI.
Runtime: about 35 s on two cores (most of it the process start).
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys

import grpc
import pytest

from certs import Authority
from factories import PROMPT
from fluxmesh.cli.supervisor import STAGES
from fluxmesh.client import Client, FluxmeshError
from fluxmesh.rpc.channels import sync_channel
from fluxmesh.rpc.security import (
    ClientSecurity,
    SecurityConfigError,
    ServerSecurity,
    read_token,
    read_tokens,
    token_matches,
)
from fluxmesh.v1 import common_pb2
from mesh import (
    NOT_SERVING,
    SERVING,
    Mesh,
    argv_of,
    children_of,
    up_stage_token,
    up_stages,
    wait_for_health,
    wait_until,
)
from rpc_tools import call

PUBLIC_TOKENS = ("public-token-1", "public-token-2")  # two lines: rotation
STAGE_TOKEN = "stage-token-only-the-orchestrator-has"
C = grpc.StatusCode


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pki")
    ca, rogue = Authority(directory, "fluxmesh"), Authority(directory, "rogue")
    tokens = directory / "public-tokens"
    # the second token may also jump the line further than the orchestrator's default ceiling (10)
    tokens.write_text(f"# accepted tokens, one per line\n{PUBLIC_TOKENS[0]}\n{PUBLIC_TOKENS[1]} max-priority=50\n")
    stage_token = directory / "stage-token"
    stage_token.write_text(STAGE_TOKEN + "\n")
    return {
        "ca": ca.pem,
        "rogue_ca": rogue.pem,
        "server": ca.issue("server", server=True),
        "orchestrator_client": ca.issue("orchestrator", server=False),
        "rogue_client": rogue.issue("intruder", server=False),
        "tokens": tokens,
        "stage_token": stage_token,
    }


def _credentials(ca=None, client=None) -> grpc.ChannelCredentials:
    return ClientSecurity(ca=ca, cert=client.cert if client else None, key=client.key if client else None).credentials()


def _stage_tls(pki) -> list[str]:
    """An orchestrator's flags for the stages' mutual TLS (the orchestrator's client certificate)."""
    client = pki["orchestrator_client"]
    return ["--stage-tls-ca", str(pki["ca"]), "--stage-tls-cert", str(client.cert), "--stage-tls-key", str(client.key)]


@pytest.fixture(scope="module")
def secure_mesh(dev_model, pki, tmp_path_factory):
    server = ["--tls-cert", str(pki["server"].cert), "--tls-key", str(pki["server"].key)]
    stage = [*server, "--tls-ca", str(pki["ca"]), "--require-client-cert", "--token-file", str(pki["stage_token"])]
    orchestrator = [*server, "--token-file", str(pki["tokens"]), *_stage_tls(pki), "--stage-token-env", "STAGE_TOKEN"]
    stage_probe = _credentials(pki["ca"], pki["orchestrator_client"])
    mesh = Mesh(
        dev_model,
        tmp_path_factory.mktemp("secure-logs"),
        stage_credential=False,  # its own: a token file on the stages, STAGE_TOKEN for the orchestrator
        extra_args={**{name: stage for name in STAGES}, "orchestrator": orchestrator},
        env={"STAGE_TOKEN": STAGE_TOKEN},
        health_credentials={**{name: stage_probe for name in STAGES}, "orchestrator": _credentials(pki["ca"])},
    )
    with mesh.start_all():
        yield mesh


def _status(address: str, method: str, *, credentials=None, token: str | None = None) -> grpc.StatusCode:
    security_metadata = (("authorization", f"Bearer {token}"),) if token else None
    channel = grpc.secure_channel(address, credentials) if credentials else sync_channel(address)
    with channel:
        code, _, _ = call(channel, method, common_pb2.InfoRequest(), timeout=10, metadata=security_metadata)
    return code


def test_a_generation_over_tls_with_a_token_works(secure_mesh, pki):
    with Client(secure_mesh.address, credentials=_credentials(pki["ca"]), token=PUBLIC_TOKENS[1], timeout=60) as client:
        result = client.generate(PROMPT, width=64, height=64, steps=1, seed=1)
    assert result.image.size == (64, 64)


def test_the_cli_takes_the_tls_and_token_flags(secure_mesh, pki, tmp_path):
    out = tmp_path / "cat.png"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "generate",
            "--address",
            secure_mesh.address,
            "-p",
            PROMPT,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--tls-ca",
            str(pki["ca"]),
            "--token-env",
            "MY_TOKEN",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MY_TOKEN": PUBLIC_TOKENS[0]},
    )
    assert done.returncode == 0, done.stderr
    assert out.stat().st_size > 0
    over = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "generate",
            "--address",
            secure_mesh.address,
            "-p",
            PROMPT,
            "--width",
            "64",
            "--height",
            "64",
            "--steps",
            "1",
            "--tls-ca",
            str(pki["ca"]),
            "--token-env",
            "MY_TOKEN",
            "--priority",
            "11",
            "-o",
            str(tmp_path / "never.png"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "MY_TOKEN": PUBLIC_TOKENS[0]},
    )
    assert over.returncode == 2 and "priority: 11 is above 10" in over.stderr, over.stderr
    health = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "health",
            secure_mesh.address,
            "--tls-ca",
            str(pki["ca"]),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert health.stdout.strip() == "SERVING"  # health checks need TLS but no token


@pytest.mark.parametrize("how", ["plaintext", "untrusted CA"])
def test_a_client_without_the_ca_is_refused(secure_mesh, pki, how):
    credentials = None if how == "plaintext" else _credentials(pki["rogue_ca"])
    code = _status(
        secure_mesh.address,
        "/fluxmesh.v1.Generator/Info",
        credentials=credentials,
        token=PUBLIC_TOKENS[0],
    )
    assert code == C.UNAVAILABLE  # no TLS session, no call


@pytest.mark.parametrize("token", [None, "wrong-token", "public-token-", STAGE_TOKEN])
def test_a_missing_or_wrong_token_is_unauthenticated(secure_mesh, pki, token):
    address = secure_mesh.address
    with Client(address, credentials=_credentials(pki["ca"]), token=token, timeout=30) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=64, height=64, steps=1)
    assert caught.value.code == C.UNAUTHENTICATED
    assert ("missing" if token is None else "invalid") in caught.value.message
    # nothing was parsed or run for it, and the server still serves the right token
    assert (
        _status(address, "/fluxmesh.v1.Generator/Info", credentials=_credentials(pki["ca"]), token=PUBLIC_TOKENS[0])
        == C.OK
    )


@pytest.mark.parametrize(
    "token,priority,allowed",
    [
        (PUBLIC_TOKENS[0], 10, True),
        (PUBLIC_TOKENS[0], 11, False),
        (PUBLIC_TOKENS[0], -100, True),
        (PUBLIC_TOKENS[1], 50, True),
        (PUBLIC_TOKENS[1], 51, False),
    ],
)
def test_priority_is_capped_per_token(secure_mesh, pki, token, priority, allowed):
    with Client(secure_mesh.address, credentials=_credentials(pki["ca"]), token=token, timeout=60) as client:
        if allowed:
            assert client.generate(PROMPT, width=64, height=64, steps=1, priority=priority).image.size == (64, 64)
            return
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=64, height=64, steps=1, priority=priority)
    assert caught.value.code == C.PERMISSION_DENIED
    assert caught.value.message.startswith(f"priority: {priority} is above {50 if token == PUBLIC_TOKENS[1] else 10}")


@pytest.mark.parametrize("stage", STAGES)
def test_a_stage_only_answers_the_orchestrators_certificate_and_token(secure_mesh, pki, stage):
    address = secure_mesh.address_of(stage)
    method = {
        "encoder": "/fluxmesh.v1.TextEncoder/Info",
        "denoiser": "/fluxmesh.v1.Denoiser/Info",
        "vae": "/fluxmesh.v1.Vae/Info",
    }[stage]
    # no client certificate, or one from another CA: the TLS handshake fails
    assert _status(address, method, credentials=_credentials(pki["ca"]), token=STAGE_TOKEN) == C.UNAVAILABLE
    assert (
        _status(address, method, credentials=_credentials(pki["ca"], pki["rogue_client"]), token=STAGE_TOKEN)
        == C.UNAVAILABLE
    )
    # the orchestrator's certificate but not the stage token (the public one is not it)
    cert = _credentials(pki["ca"], pki["orchestrator_client"])
    assert _status(address, method, credentials=cert) == C.UNAUTHENTICATED
    assert _status(address, method, credentials=cert, token=PUBLIC_TOKENS[0]) == C.UNAUTHENTICATED
    assert _status(address, method, credentials=cert, token=STAGE_TOKEN) == C.OK


def test_an_unloaded_stage_makes_the_orchestrator_not_serving(secure_mesh, pki):
    """In resident mode a stage whose weights were released serves nothing: the orchestrator's
    health says so, and says SERVING again once they are back (only the orchestrator's
    certificate and stage token may move them)."""
    from fluxmesh.v1 import residency_pb2, residency_pb2_grpc

    cert = _credentials(pki["ca"], pki["orchestrator_client"])
    token = (("authorization", f"Bearer {STAGE_TOKEN}"),)
    with grpc.secure_channel(secure_mesh.address_of("vae"), cert) as channel:
        stub = residency_pb2_grpc.ResidencyStub(channel)
        try:
            assert stub.Release(residency_pb2.ReleaseRequest(), timeout=30, metadata=token).state == "released"
            secure_mesh.wait_health(NOT_SERVING, timeout=10)
        finally:
            assert stub.Load(residency_pb2.LoadRequest(), timeout=60, metadata=token).state == "resident"
    secure_mesh.wait_health(SERVING, timeout=10)
    assert "vae stage at" in secure_mesh.log("orchestrator") and "weights are released" in secure_mesh.log(
        "orchestrator"
    )


def test_an_orchestrator_without_the_stage_token_is_not_serving_and_says_whose_fault(secure_mesh, pki, tmp_path):
    """The stages demand a token this orchestrator was not given: it must not say SERVING, and a
    caller with the right public token hears that a stage is unavailable, never that *its*
    bearer token is missing."""
    stages = {stage: secure_mesh.address_of(stage) for stage in STAGES}
    tls_only = {"orchestrator": _stage_tls(pki)}
    with Mesh(logs=tmp_path, stages=stages, stage_credential=False, extra_args=tls_only) as cluster:
        cluster.start("orchestrator")

        def refused_by_every_stage() -> bool:  # what the monitor logs once a round saw it
            log = cluster.log("orchestrator")
            return all(f"{stage} stage at {stages[stage]} cannot serve: it refuses" in log for stage in STAGES)

        wait_until(refused_by_every_stage, what="the monitor's verdict on every stage")
        assert cluster.health() == NOT_SERVING
        with Client(cluster.address, timeout=30) as client:
            with pytest.raises(FluxmeshError) as caught:
                client.generate(PROMPT, width=64, height=64, steps=1)
    assert caught.value.code == C.UNAVAILABLE, caught.value
    assert any(f"{stage} stage" in caught.value.message for stage in STAGES), caught.value.message
    assert "bearer" not in caught.value.message.lower() and "credential" in caught.value.message


def test_local_stages_demand_a_token_only_their_orchestrator_has(secure_up):
    """start_local (`fluxmesh up`, `demo`) makes a random stage token per start and hands it to
    its children in their environment: any other local process is refused, and the token is in
    no process's argv (which /proc shows to every user)."""
    from fluxmesh.v1 import residency_pb2

    up, _ = secure_up
    token = up_stage_token(up.pid)
    assert token and len(token) >= 32
    for child in children_of(up.pid):
        assert token not in " ".join(argv_of(child)), argv_of(child)
    for stage, (_, address) in up_stages(up.pid).items():
        service = {"encoder": "TextEncoder", "denoiser": "Denoiser", "vae": "Vae"}[stage]
        assert _status(address, f"/fluxmesh.v1.{service}/Info") == C.UNAUTHENTICATED
        with sync_channel(address) as channel:
            code, _, _ = call(channel, "/fluxmesh.v1.Residency/Release", residency_pb2.ReleaseRequest(), timeout=10)
        assert code == C.UNAUTHENTICATED
        assert _status(address, f"/fluxmesh.v1.{service}/Info", token=token) == C.OK


def _listening_addresses(pid: int) -> set[str]:
    """'ip:port' of every TCP socket process `pid` listens on, from /proc (gRPC binds IPv6
    sockets with IPv4-mapped addresses, so tcp6 is read too; an IPv4-mapped one reads as IPv4)."""
    inodes = {
        os.readlink(f"/proc/{pid}/fd/{fd}")[8:-1]
        for fd in os.listdir(f"/proc/{pid}/fd")
        if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:[")
    }

    def ipv4(word: str) -> str:  # one 32-bit word, printed in host (little-endian) order
        return ".".join(str(int(word[i : i + 2], 16)) for i in (6, 4, 2, 0))

    found = set()
    for table in ("tcp", "tcp6"):
        for row in open(f"/proc/{pid}/net/{table}").read().splitlines()[1:]:
            fields = row.split()
            (ip_hex, port_hex), state, inode = fields[1].split(":"), fields[3], fields[9]
            if state != "0A" or inode not in inodes:  # 0A: LISTEN
                continue
            if len(ip_hex) == 8:
                ip = ipv4(ip_hex)
            elif ip_hex[:24] == "0000000000000000FFFF0000":
                ip = ipv4(ip_hex[24:])
            else:
                ip = "[::]" if set(ip_hex) == {"0"} else ip_hex
            found.add(f"{ip}:{int(port_hex, 16)}")
    return found


@pytest.fixture(scope="module")
def secure_up(dev_model, pki, tmp_path_factory):
    """`fluxmesh up --host 0.0.0.0` with TLS and tokens (its own start path, under test):
    (the `up` process, the orchestrator's address) once SERVING."""
    from fluxmesh.cli.supervisor import free_port

    port = free_port()
    log = tmp_path_factory.mktemp("secure-up") / "up.log"
    output = log.open("wb")  # a file, not a pipe: four processes log into it while nobody reads
    up = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "up",
            "--model",
            str(dev_model),
            "--threads",
            "1",
            "--host",
            "0.0.0.0",
            "--port",
            str(port),
            "--tls-cert",
            str(pki["server"].cert),
            "--tls-key",
            str(pki["server"].key),
            "--token-file",
            str(pki["tokens"]),
            "--max-priority",
            "0",
        ],
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    output.close()  # the child holds its own descriptor
    try:
        address = f"127.0.0.1:{port}"
        read = functools.partial(log.read_text, errors="replace")
        wait_for_health(address, timeout=180, credentials=_credentials(pki["ca"]), process=up, output=read)
        yield up, address
    finally:
        up.terminate()
        up.wait(timeout=60)


def test_up_exposes_only_the_orchestrator_and_secures_it(secure_up, pki):
    """`fluxmesh up --host 0.0.0.0` with TLS and tokens: the orchestrator alone listens on every
    interface, demanding TLS and a token; the stages listen on loopback only."""
    up, address = secure_up
    port = int(address.rpartition(":")[2])
    with Client(address, credentials=_credentials(pki["ca"]), token=PUBLIC_TOKENS[1], timeout=60) as client:
        assert client.generate(PROMPT, width=64, height=64, steps=1, priority=50).images[0].size == (64, 64)
    with Client(address, credentials=_credentials(pki["ca"]), token=PUBLIC_TOKENS[0], timeout=60) as client:
        with pytest.raises(FluxmeshError) as caught:  # up's --max-priority 0: no grant, no overtaking
            client.generate(PROMPT, width=64, height=64, steps=1, priority=1)
    assert caught.value.code == C.PERMISSION_DENIED
    assert _status(address, "/fluxmesh.v1.Generator/Info", credentials=_credentials(pki["ca"])) == C.UNAUTHENTICATED
    assert _status(address, "/fluxmesh.v1.Generator/Info", token=PUBLIC_TOKENS[0]) == C.UNAVAILABLE  # no TLS

    listening = {pid: _listening_addresses(pid) for pid in children_of(up.pid)}
    assert sorted(map(len, listening.values())) == [1, 1, 1, 1]
    public = [pid for pid, addresses in listening.items() if addresses & {f"0.0.0.0:{port}", f"[::]:{port}"}]
    assert len(public) == 1, listening
    for pid, addresses in listening.items():
        if pid not in public:
            assert all(a.startswith("127.0.0.1:") for a in addresses), listening
            # and on loopback they demand up's own stage token: no local process gets past
            # the orchestrator's tokens, queue and priority ceilings by calling them directly
            for stage_address in addresses:
                assert _status(stage_address, "/fluxmesh.v1.Residency/Status") == C.UNAUTHENTICATED
                assert (
                    _status(stage_address, "/fluxmesh.v1.Residency/Status", token=PUBLIC_TOKENS[1]) == C.UNAUTHENTICATED
                )


# --- the pieces, in-process ------------------------------------------------------------------


def test_tokens_compare_in_constant_time_against_every_accepted_token(monkeypatch):
    import hmac

    compared = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert token_matches("b", ["a", "b", "c"])
    assert len(compared) == 3  # no early exit on the match: timing does not tell which one matched
    assert not token_matches(None, ["a"]) and not token_matches("", ["a"]) and not token_matches("ab", ["a"])


def test_token_files_grant_priorities_and_refuse_anything_else(tmp_path):
    from fluxmesh.rpc.security import read_priority_grants

    file = tmp_path / "tokens"
    file.write_text("plain\nboss max-priority=100\nbatch max-priority=-5\n")
    assert read_tokens(file=file) == ("plain", "boss", "batch")
    assert read_priority_grants(file) == {"boss": 100, "batch": -5}
    for bad in ("tok admin\n", "tok max-priority=high\n", "tok max-priority\n"):
        file.write_text(bad)
        with pytest.raises(SecurityConfigError, match="is not max-priority=<integer>"):
            read_tokens(file=file)


def test_token_sources(tmp_path, monkeypatch):
    file = tmp_path / "tokens"
    file.write_text("# comment\n\n  one  \ntwo\n")
    assert read_tokens(file=file) == ("one", "two")
    assert read_token(file=file) == "one"
    monkeypatch.setenv("FLUXMESH_TOKEN", "three")
    assert read_tokens(file=file, env="FLUXMESH_TOKEN") == ("one", "two", "three")
    assert read_token() is None
    for bad in ("", "# only a comment\n"):
        file.write_text(bad)
        with pytest.raises(SecurityConfigError, match="holds no token"):
            read_tokens(file=file)
    monkeypatch.setenv("EMPTY", " ")
    with pytest.raises(SecurityConfigError, match="EMPTY is unset or empty"):
        read_tokens(env="EMPTY")
    with pytest.raises(SecurityConfigError, match="token file"):
        read_tokens(file=tmp_path / "missing")


def test_settings_that_cannot_work_are_refused(pki):
    server = pki["server"]
    with pytest.raises(SecurityConfigError, match="go together"):
        ServerSecurity(cert=server.cert)
    with pytest.raises(SecurityConfigError, match="--require-client-cert needs"):
        ServerSecurity(cert=server.cert, key=server.key, require_client_cert=True)
    with pytest.raises(SecurityConfigError, match="both --tls-cert and --tls-key"):
        ClientSecurity(cert=server.cert)
    assert ServerSecurity().credentials() is None and ServerSecurity().describe() == "plaintext"
    assert (
        ServerSecurity(
            cert=server.cert, key=server.key, ca=pki["ca"], require_client_cert=True, tokens=("t",)
        ).describe()
        == "mutual TLS + bearer token"
    )


def test_a_serve_command_with_a_missing_token_source_is_a_usage_error(dev_model):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "serve",
            "vae",
            "--model",
            str(dev_model),
            "--token-env",
            "FLUXMESH_NO_SUCH_VARIABLE",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "300"},
    )  # rich must not wrap the message
    assert done.returncode == 2
    assert "FLUXMESH_NO_SUCH_VARIABLE is unset or empty" in done.stderr
    assert "Traceback" not in done.stderr


def test_weights_are_never_unpickled(dev_model, tmp_path):
    """A model folder whose VAE ships only as a pickle (.bin) is refused, not loaded."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.vae.engine import VaeEngine

    folder = tmp_path / "pickled"
    shutil.copytree(dev_model, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), folder / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(OSError, match="safetensors"):
        VaeEngine(folder, Device.parse("cpu"))


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "vae", "--model", "m"],
        ["serve", "encoder", "--model", "m"],
        ["serve", "denoiser", "--model", "m"],
        ["serve", "orchestrator"],
    ],
)
def test_serve_listens_on_loopback_unless_told_otherwise(monkeypatch, argv):
    """Safe by default: no stage (nor the orchestrator) is reachable from another machine unless
    --host says so (and then the server warns while it demands no credential)."""
    from typer.testing import CliRunner

    import fluxmesh.orchestrator.app as orchestrator_app
    import fluxmesh.services.app as stage_app
    from fluxmesh.cli.main import app

    started = []
    monkeypatch.setattr(stage_app, "serve_stage", started.append)
    monkeypatch.setattr(orchestrator_app, "serve_orchestrator", started.append)
    for extra, host in (([], "127.0.0.1"), (["--host", "0.0.0.0"], "0.0.0.0")):
        result = CliRunner().invoke(app, argv + extra)
        assert result.exit_code == 0, result.output
        assert started.pop().address.rpartition(":")[0] == host


@pytest.mark.parametrize("make", ["sync", "async"])
def test_the_sdk_sends_no_token_in_the_clear_beyond_loopback_unless_told(pki, make):
    """A bearer token over plaintext to another host could be read on the way: refused before any
    connection, unless the address is loopback, TLS is used, or the caller allows it."""
    import asyncio

    from fluxmesh.client import AsyncClient

    def build(address, **kwargs):
        if make == "sync":
            Client(address, **kwargs).close()
        else:

            async def go():
                await AsyncClient(address, **kwargs).close()

            asyncio.run(go())

    with pytest.raises(FluxmeshError) as caught:
        build("gen.example.com:50050", token="t")
    assert caught.value.code == C.INVALID_ARGUMENT and caught.value.message.startswith("token: refusing")
    for address, kwargs in (
        ("gen.example.com:50050", {"token": "t", "allow_plaintext_token": True}),
        ("gen.example.com:50050", {"token": "t", "credentials": _credentials(pki["ca"])}),
        ("gen.example.com:50050", {}),  # no token: nothing to leak
        ("127.0.0.1:50050", {"token": "t"}),
        ("localhost:50050", {"token": "t"}),
        ("[::1]:50050", {"token": "t"}),
    ):
        build(address, **kwargs)


def test_the_cli_sends_no_token_in_the_clear_beyond_loopback_unless_told(monkeypatch):
    from typer.testing import CliRunner

    from fluxmesh.cli.main import app

    monkeypatch.setenv("MY_TOKEN", "t")
    result = CliRunner().invoke(app, ["info", "--address", "gen.example.com:50050", "--token-env", "MY_TOKEN"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert (
        "refusing to send a bearer token over plaintext" in result.output and "--allow-plaintext-token" in result.output
    )
    allowed = CliRunner().invoke(app, ["info", "--address", "127.0.0.1:1", "--token-env", "MY_TOKEN"])
    assert allowed.exit_code == 2 and "UNAVAILABLE" in allowed.output  # it tried: nobody listens there
    assert len([line for line in allowed.output.splitlines() if line.strip()]) == 1  # one line, no traceback
