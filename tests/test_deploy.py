"""docker-compose.yml, deploy/Dockerfile and deploy/kubernetes/ against the real CLI.

No Docker engine or cluster here: the files are parsed, and every command, flag, port and health
check in them is run through the very `fluxmesh` typer app the images run, with only the last
step (serving, starting children, dialling a health check) replaced by a recorder. An unknown
flag, a bad value or a missing option fails here as it would in the container, and the values
that reach the servers' options are checked.
"""

from __future__ import annotations

import json
import re
import signal
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fluxmesh.cli.main import app

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
STAGE_PORTS = {"encoder": 50051, "denoiser": 50052, "vae": 50053}


class _Started(Exception):
    """`fluxmesh up` got as far as starting its children."""


@pytest.fixture
def cli(monkeypatch):
    """run(["fluxmesh", ...]) -> what the command would have started: ("stage", StageOptions),
    ("orchestrator", OrchestratorOptions), ("up", model, start_local kwargs) or ("health", address)."""
    import fluxmesh.cli.supervisor as supervisor
    import fluxmesh.orchestrator.app as orchestrator_app
    import fluxmesh.services.app as stage_app

    calls = []
    monkeypatch.setattr(stage_app, "serve_stage", lambda options: calls.append(("stage", options)))
    monkeypatch.setattr(orchestrator_app, "serve_orchestrator", lambda options: calls.append(("orchestrator", options)))
    monkeypatch.setattr(supervisor, "health_status",
                        lambda address, *args, **kwargs: calls.append(("health", address)) or 1)

    def start_local(model, **kwargs):
        calls.append(("up", model, kwargs))
        raise _Started

    monkeypatch.setattr(supervisor, "start_local", start_local)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # `up` hooks SIGTERM: not in pytest

    def run(argv: list[str], *, ok: bool = True):
        assert argv[0] == "fluxmesh", argv
        calls.clear()
        result = CliRunner().invoke(app, argv[1:])
        if ok:
            assert result.exit_code == 0 or isinstance(result.exception, _Started), (argv, result.output)
            assert len(calls) == 1, calls
            return calls[0]
        return result

    return run


def option(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} with nothing set: the default."""
    return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)


def entrypoints() -> dict[str, list[str]]:
    """Each build target's ENTRYPOINT, from the Dockerfile."""
    found, target = {}, None
    for line in DOCKERFILE.read_text().splitlines():
        if m := re.match(r"FROM\s+\S+\s+AS\s+(\w+)", line, re.I):
            target = m.group(1)
        elif line.startswith("ENTRYPOINT"):
            found[target] = json.loads(line.removeprefix("ENTRYPOINT"))
    return found


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _argv(service: dict) -> list[str]:
    target = service["build"]["target"]
    return entrypoints()[target] + [substitute(arg) for arg in service["command"]]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_every_compose_command_runs_with_the_real_cli(compose, cli):
    for name, service in compose["services"].items():
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["build"]["target"] in entrypoints(), name
        argv = _argv(service)
        call = cli(argv)
        if name in STAGE_PORTS:
            assert call[0] == "stage" and call[1].stage == name
            assert _port(call[1].address) == STAGE_PORTS[name] and call[1].device == "cuda:0"
            assert call[1].model == "black-forest-labs/FLUX.1-dev"
        elif name == "orchestrator":
            assert call[0] == "orchestrator" and _port(call[1].address) == 50050
        else:
            assert call[0] == "up" and call[2]["port"] == 50050, call


def test_compose_health_checks_call_fluxmesh_health_on_the_served_port(compose, cli):
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert cli(test[1:]) == ("health", f"localhost:{option(_argv(service), '--port')}"), name


def test_compose_stages_are_pinned_to_gpus_chosen_by_environment(compose):
    services = compose["services"]
    for stage, variable in (("encoder", "ENCODER_GPU"), ("denoiser", "DENOISER_GPU"), ("vae", "VAE_GPU"),
                            ("sequential", "GPU")):
        (device,) = services[stage]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (ids,) = device["device_ids"]
        assert ids.startswith("${" + variable + ":-"), ids
        assert option(_argv(services[stage]), "--device") == "cuda:0"  # the one GPU the container sees
    defaults = [substitute(services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0])
                for s in STAGE_PORTS]
    assert defaults == ["0", "1", "2"]  # one GPU per stage unless told otherwise


def test_compose_orchestrator_reaches_each_stage_on_its_port(compose, cli):
    services = compose["services"]
    _, options = cli(_argv(services["orchestrator"]))
    for stage, port in STAGE_PORTS.items():
        assert getattr(options, stage) == f"{stage}:{port}"
        assert _port(cli(_argv(services[stage]))[1].address) == port
        assert "profiles" not in services[stage]
    published = services["orchestrator"]["ports"][0]
    assert substitute(published) == f"50050:{_port(options.address)}"


def test_compose_volumes_and_the_sequential_profile(compose, cli):
    assert set(compose["volumes"]) == {"models", "hf-cache"}
    for name, service in compose["services"].items():
        if name == "orchestrator":
            continue
        assert {"models:/models", "hf-cache:/cache/huggingface"} <= set(service["volumes"]), name
        assert service["environment"]["HF_HOME"] == "/cache/huggingface"
    sequential = compose["services"]["sequential"]
    assert sequential["profiles"] == ["sequential"]
    _, model, started = cli(_argv(sequential))
    assert started["orchestrator_args"][:1] == ["--sequential"]
    assert "--residency" in started["common_args"]  # stages start released/offloaded, never all loaded
    assert started["stage_args"]["denoiser"][:2] == ["--transformer-gguf", "/models/flux1-dev-Q8_0.gguf"]


def _k8s_documents() -> list[dict]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_kubernetes_deployments_run_real_commands_with_matching_ports_and_probes(cli):
    docs = _k8s_documents()
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    assert set(deployments) == {f"fluxmesh-{s}" for s in (*STAGE_PORTS, "orchestrator")}
    images = {"fluxmesh-stages:latest": "stages", "fluxmesh:latest": "orchestrator"}
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        kind, options = cli(entrypoints()[images[container["image"]]] + container["args"])
        port = _port(options.address)
        assert [p["containerPort"] for p in container["ports"]] == [port]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            if "exec" in container.get(probe, {}):
                assert cli(container[probe]["exec"]["command"]) == ("health", f"localhost:{port}"), (name, probe)
        assert "readinessProbe" in container and "livenessProbe" in container
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"] == labels
        if kind == "stage":
            assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
            assert port == STAGE_PORTS[options.stage] and name == f"fluxmesh-{options.stage}"


def test_kubernetes_orchestrator_round_robins_over_headless_stage_services(cli):
    docs = _k8s_documents()
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deployments = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Deployment"}
    (orchestrator,) = deployments["fluxmesh-orchestrator"]["spec"]["template"]["spec"]["containers"]
    _, options = cli(entrypoints()["orchestrator"] + orchestrator["args"])
    for stage, port in STAGE_PORTS.items():
        service = services[f"fluxmesh-{stage}"]
        assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
        pod_labels = deployments[f"fluxmesh-{stage}"]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= pod_labels.items()
        assert [p["port"] for p in service["spec"]["ports"]] == [port]
        namespace = service["metadata"]["namespace"]
        assert getattr(options, stage) == f"dns:///fluxmesh-{stage}.{namespace}.svc.cluster.local:{port}"
    public = services["fluxmesh"]
    assert public["spec"]["ports"][0]["port"] == 50050 and "clusterIP" not in public["spec"]


def test_the_cli_runner_here_rejects_what_the_cli_rejects(cli):
    """The checks above can fail: a wrong flag, value or missing option does not run."""
    for argv in (["fluxmesh", "serve", "denoiser", "--model", "m", "--prot", "1"],
                 ["fluxmesh", "serve", "vae", "--model", "m", "--port", "fifty"],
                 ["fluxmesh", "serve", "orchestrator", "--release-to", "nowhere"],
                 ["fluxmesh", "serve", "encoder"],
                 ["fluxmesh", "helth", "localhost:1"]):
        result = cli(argv, ok=False)
        assert result.exit_code == 2, (argv, result.output)
