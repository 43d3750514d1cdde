"""docker-compose.yml, deploy/Dockerfile and deploy/kubernetes/ against the real CLI.

No Docker engine or cluster here: the files are parsed, and every command, flag, port and health
check in them is run through the very `fluxmesh` typer app the images run, with only the last
step (serving, starting children, dialling a health check) replaced by a recorder. An unknown
flag, a bad value or a missing option fails here as it would in the container, and the values
that reach the servers' options are checked.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import subprocess
from pathlib import Path

import grpc
import pytest
import yaml
from typer.testing import CliRunner

from fluxmesh.cli.main import app

try:
    import kubernetes_validate
    import kubernetes_validate.utils
except ImportError:  # the test extra has it
    kubernetes_validate = None

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_CPU = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
K8S = ROOT / "deploy" / "kubernetes"
STAGE_PORTS = {"encoder": 50051, "denoiser": 50052, "vae": 50053}


class _Started(Exception):
    """`fluxmesh up` got as far as starting its children."""


@pytest.fixture
def cli(monkeypatch):
    """run(["fluxmesh", ...]) -> what the command would have started: ("stage", StageOptions),
    ("orchestrator", OrchestratorOptions), ("up", model, start_local kwargs) or ("health", address)."""
    import fluxmesh.cli.commands.local as local
    import fluxmesh.cli.supervisor as supervisor
    import fluxmesh.orchestrator.app as orchestrator_app
    import fluxmesh.services.app as stage_app

    calls = []
    monkeypatch.setattr(stage_app, "serve_stage", lambda options: calls.append(("stage", options)))
    monkeypatch.setattr(orchestrator_app, "serve_orchestrator", lambda options: calls.append(("orchestrator", options)))
    monkeypatch.setattr(
        supervisor, "health_status", lambda address, *args, **kwargs: calls.append(("health", address)) or 1
    )

    def start_local(model, **kwargs):
        calls.append(("up", model, kwargs))
        raise _Started

    monkeypatch.setattr(supervisor, "start_local", start_local)
    # The deploy files name paths inside the containers (the model volume), which `up`'s check
    # of its model files cannot see from this host; that check is tested in test_cli_errors.
    monkeypatch.setattr(local, "_check_model_files", lambda *args, **kwargs: None)
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # `up` hooks SIGTERM: not in pytest

    def run(argv: list[str], *, ok: bool = True, env: dict[str, str] | None = None):
        assert argv[0] == "fluxmesh", argv
        calls.clear()
        result = CliRunner().invoke(app, argv[1:], env=env)
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


class _ComposeLoader(yaml.SafeLoader):
    """Compose override files use `!reset` / `!override` (compose spec merge tags)."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_multi_constructor("!", lambda loader, suffix, node: loader.construct_object(node))


def _load_compose(*paths: Path) -> dict:
    """docker-compose.yml with overrides merged as compose merges them (mappings deep, others replaced)."""

    def merge(base, override):
        if isinstance(base, dict) and isinstance(override, dict):
            return {**base, **{k: merge(base.get(k), v) for k, v in override.items()}}
        return override

    merged: dict = {}
    for path in paths:
        merged = merge(merged, yaml.load(path.read_text(), Loader=_ComposeLoader))  # noqa: S506 (safe loader)
    return merged


@pytest.fixture(scope="module")
def compose() -> dict:
    return _load_compose(COMPOSE)


@pytest.fixture
def in_container(cli, tmp_path):
    """in_container(compose, name, argv) -> cli(argv) as the service's container would run it, its
    compose secrets mounted at /run/secrets/NAME (each must be declared and given to the service)."""

    def run(compose: dict, name: str, argv: list[str]):
        local = []
        for arg in argv:
            if arg.startswith("/run/secrets/"):
                secret = arg.removeprefix("/run/secrets/")
                assert secret in compose["services"][name].get("secrets", []), (name, secret)
                assert "file" in compose["secrets"][secret], secret
                arg = str(tmp_path / secret)
                Path(arg).write_text(f"value-of-{secret}\n")
            local.append(arg)
        return cli(local)

    return run


def _argv(service: dict) -> list[str]:
    target = service["build"]["target"]
    return entrypoints()[target] + [substitute(arg) for arg in service["command"]]


def _port(address: str) -> int:
    return int(address.rpartition(":")[2])


def test_every_compose_command_runs_with_the_real_cli(compose, in_container):
    for name, service in compose["services"].items():
        assert (ROOT / service["build"]["dockerfile"]).is_file()
        assert service["build"]["target"] in entrypoints(), name
        call = in_container(compose, name, _argv(service))
        if name in STAGE_PORTS:
            assert call[0] == "stage" and call[1].stage == name
            assert _port(call[1].address) == STAGE_PORTS[name] and call[1].device == "cuda:0"
            assert call[1].model == "black-forest-labs/FLUX.1-dev"
        elif name == "orchestrator":
            assert call[0] == "orchestrator" and _port(call[1].address) == 50050
        if name in (*STAGE_PORTS, "orchestrator"):  # reachable from the other containers, said explicitly
            assert call[1].address.startswith("0.0.0.0:"), (name, call[1].address)
        else:
            assert call[0] == "up" and call[2]["port"] == 50050, call


def test_compose_health_checks_call_fluxmesh_health_on_the_served_port(compose, cli):
    for name, service in compose["services"].items():
        test = service["healthcheck"]["test"]
        assert test[0] == "CMD", name
        assert cli(test[1:]) == ("health", f"localhost:{option(_argv(service), '--port')}"), name


def test_compose_stages_are_pinned_to_gpus_chosen_by_environment(compose):
    services = compose["services"]
    for stage, variable in (
        ("encoder", "ENCODER_GPU"),
        ("denoiser", "DENOISER_GPU"),
        ("vae", "VAE_GPU"),
        ("sequential", "GPU"),
    ):
        (device,) = services[stage]["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        (ids,) = device["device_ids"]
        assert ids.startswith("${" + variable + ":-"), ids
        assert option(_argv(services[stage]), "--device") == "cuda:0"  # the one GPU the container sees
    defaults = [
        substitute(services[s]["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"][0])
        for s in STAGE_PORTS
    ]
    assert defaults == ["0", "1", "2"]  # one GPU per stage unless told otherwise


def test_compose_orchestrator_reaches_each_stage_on_its_port(compose, in_container):
    services = compose["services"]
    _, options = in_container(compose, "orchestrator", _argv(services["orchestrator"]))
    for stage, port in STAGE_PORTS.items():
        assert getattr(options, stage) == f"{stage}:{port}"
        assert _port(in_container(compose, stage, _argv(services[stage]))[1].address) == port
        assert "profiles" not in services[stage]
    for name in ("orchestrator", "sequential"):  # published on this host's loopback unless told
        (published,) = services[name]["ports"]
        assert substitute(published) == "127.0.0.1:50050:50050"
        assert published.startswith("${FLUXMESH_BIND:-127.0.0.1}:")


def test_compose_stages_demand_the_stage_token_only_the_orchestrator_holds(compose, in_container):
    services = compose["services"]
    for stage in STAGE_PORTS:
        argv = _argv(services[stage])
        assert option(argv, "--token-file") == "/run/secrets/stage-token"
        assert services[stage]["secrets"] == ["stage-token"]
        assert in_container(compose, stage, argv)[1].security.tokens == ("value-of-stage-token",)
    orchestrator = _argv(services["orchestrator"])
    assert option(orchestrator, "--stage-token-file") == "/run/secrets/stage-token"
    for name in ("orchestrator", "sequential"):  # the public side demands client tokens
        assert option(_argv(services[name]), "--token-file") == "/run/secrets/client-tokens"
    assert "stage-token" not in services["sequential"]["secrets"]  # its stages are its own children
    assert set(compose["secrets"]) == {"stage-token", "client-tokens"}


def test_the_cpu_override_runs_every_stage_on_the_cpu_without_gpus(in_container):
    compose = _load_compose(COMPOSE, COMPOSE_CPU)
    services = compose["services"]
    for name, service in services.items():
        assert service.get("deploy") is None, name  # no GPU reservation left
        call = in_container(compose, name, _argv(service))
        if name in STAGE_PORTS:
            assert call[1].device == "cpu" and call[1].model == "/models/tiny" and call[1].threads == 1
            assert call[1].security.tokens == ("value-of-stage-token",)
        elif name == "sequential":
            common = call[2]["common_args"]
            assert option(common, "--device") == "cpu" and option(common, "--threads") == "1", common
        assert service["healthcheck"]["test"] == _load_compose(COMPOSE)["services"][name]["healthcheck"]["test"]


def test_the_stages_image_defaults_to_the_cuda_build_of_the_torch_the_project_pins():
    (pinned,) = set(re.findall(r"torch==([\d.]+)", (ROOT / "README.md").read_text()))
    default = re.search(r"^ARG TORCH_IMAGE=(\S+)$", DOCKERFILE.read_text(), re.MULTILINE).group(1)
    repository, tag = default.split(":")
    assert repository == "pytorch/pytorch" and tag.startswith(f"{pinned}-cuda"), default


def test_compose_volumes_and_the_sequential_profile(compose, in_container):
    assert set(compose["volumes"]) == {"models", "hf-cache"}
    for name, service in compose["services"].items():
        if name == "orchestrator":
            continue
        assert {"models:/models", "hf-cache:/cache/huggingface"} <= set(service["volumes"]), name
        assert service["environment"]["HF_HOME"] == "/cache/huggingface"
    sequential = compose["services"]["sequential"]
    assert sequential["profiles"] == ["sequential"]
    _, _model, started = in_container(compose, "sequential", _argv(sequential))
    assert started["orchestrator_args"][:1] == ["--sequential"]
    assert "--residency" in started["common_args"]  # stages start released/offloaded, never all loaded
    assert started["stage_args"]["denoiser"][:2] == ["--transformer-gguf", "/models/flux1-dev-Q8_0.gguf"]


OVERLAYS = sorted(p.name for p in (K8S / "overlays").iterdir())
# Kinds from the operators a cluster adds (cert-manager, KEDA, prometheus-operator): no schema in
# kubernetes-validate, so the tests below check the fields fluxmesh relies on.
OPERATOR_KINDS = {"Certificate", "Issuer", "ScaledObject", "PodMonitor"}


def _kustomize(directory: Path) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the overlays cannot be rendered here (kubectl kustomize)")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60, check=False
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict]]:
    """Each overlay as `kubectl kustomize` renders it: what `kubectl apply -k` would send."""
    return {name: _kustomize(K8S / "overlays" / name) for name in OVERLAYS}


def _by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _container(deployment: dict) -> dict:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _pod_env(container: dict) -> dict[str, str]:
    """The container's environment as the kubelet gives it, a secret's value standing in."""
    return {e["name"]: e.get("value", f"value-of-{e['name']}") for e in container.get("env", [])}


@pytest.fixture
def in_pod(cli, tmp_path):
    """in_pod(deployment, argv) -> cli(argv) as the container would run it: its environment, and
    each mounted secret a folder of files (the CLI reads token files as it parses)."""

    def run(deployment: dict, argv: list[str]):
        container = _container(deployment)
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
        mounts = {}
        for mount in container.get("volumeMounts", []):
            if "secret" in volumes[mount["name"]]:
                folder = tmp_path / mount["name"]
                folder.mkdir(exist_ok=True)
                mounts[mount["mountPath"]] = str(folder)
        local = []
        for arg in argv:
            for path, folder in mounts.items():
                if arg.startswith(path + "/"):
                    arg = folder + arg.removeprefix(path)
                    Path(arg).write_text("secret-from-the-cluster\n")
            local.append(arg)
        return cli(local, env=_pod_env(container))

    return run


def _component(deployment: dict) -> str:
    return deployment["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"]


def test_the_overlays_are_the_three_placements():
    assert OVERLAYS == ["one-gpu-per-stage", "replicas", "sequential"]
    files = {p.relative_to(K8S) for p in K8S.rglob("*.yaml")}
    listed = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = yaml.safe_load(kustomization.read_text())
        for entry in spec.get("resources", []) + [p["path"] for p in spec.get("patches", []) if "path" in p]:
            target = (kustomization.parent / entry).resolve()
            if target.is_file():
                listed.add(target.relative_to(K8S.resolve()))
    assert files - listed == {p.relative_to(K8S) for p in K8S.rglob("kustomization.yaml")}  # no stray file


@pytest.mark.parametrize("version", kubernetes_validate.utils.all_versions()[-4:] if kubernetes_validate else [])
def test_every_overlay_is_valid_for_current_kubernetes_releases(overlays, version):
    """Strict schema validation (unknown fields rejected) against the API of each release."""
    for name, docs in overlays.items():
        for doc in docs:
            if doc["kind"] in OPERATOR_KINDS:
                continue
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as error:
                pytest.fail(
                    f"{name}: {doc['kind']}/{doc['metadata']['name']} invalid for {version}: "
                    f"{error.message} at {list(error.path)}"
                )
    assert {d["kind"] for docs in overlays.values() for d in docs} - OPERATOR_KINDS >= {
        "Namespace",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "PersistentVolumeClaim",
    }


def test_the_schema_check_can_fail():
    if kubernetes_validate is None:
        pytest.skip("kubernetes-validate is not installed (pip install fluxmesh[test])")
    docs = yaml.safe_load_all((K8S / "stages" / "denoiser.yaml").read_text())
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    _container(deployment)["resources"]["limit"] = {"nvidia.com/gpu": 1}  # a typo a user makes
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, kubernetes_validate.latest_version(), strict=True)


def test_every_deployment_runs_real_commands_with_matching_ports_and_probes(overlays, in_pod):
    images = {"fluxmesh-stages:latest": "stages", "fluxmesh:latest": "orchestrator"}
    for docs in overlays.values():
        for name, deployment in _by_kind(docs, "Deployment").items():
            container = _container(deployment)
            kind, *options = in_pod(deployment, entrypoints()[images[container["image"]]] + container["args"])
            port = options[1]["port"] if kind == "up" else _port(options[0].address)
            assert [p["containerPort"] for p in container["ports"] if p["name"] == "grpc"] == [port]
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if "exec" in container.get(probe, {}):
                    assert in_pod(deployment, container[probe]["exec"]["command"]) == ("health", f"localhost:{port}"), (
                        name,
                        probe,
                    )
            assert (
                deployment["spec"]["selector"]["matchLabels"].items()
                <= deployment["spec"]["template"]["metadata"]["labels"].items()
            )
            if kind == "stage":
                assert port == STAGE_PORTS[options[0].stage] and name == f"fluxmesh-{options[0].stage}"
            if kind in ("stage", "orchestrator"):  # reachable from other pods, said explicitly
                assert options[0].address.startswith("[::]:"), (name, options[0].address)


def test_pods_drain_before_they_go_and_are_not_killed_while_loading(overlays):
    from fluxmesh.rpc.server import DEFAULT_GRACE_SECONDS

    for overlay, docs in overlays.items():
        for name, deployment in _by_kind(docs, "Deployment").items():
            pod = deployment["spec"]["template"]["spec"]
            container = _container(deployment)
            pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
            assert pre_stop[0] == "sleep"
            # SIGTERM comes after preStop; the server then drains for its grace period.
            assert pod["terminationGracePeriodSeconds"] >= int(pre_stop[1]) + DEFAULT_GRACE_SECONDS + 10, name
            assert "readinessProbe" in container and "livenessProbe" in container
            if "exec" in container["livenessProbe"]:  # a process that loads weights: liveness waits
                startup = container["startupProbe"]
                assert startup["periodSeconds"] * startup["failureThreshold"] >= 1800, (overlay, name)


def test_gpu_stages_request_a_gpu_tolerate_gpu_nodes_and_spread(overlays):
    for overlay, docs in overlays.items():
        for name, deployment in _by_kind(docs, "Deployment").items():
            pod = deployment["spec"]["template"]["spec"]
            resources = _container(deployment)["resources"]
            if _component(deployment) == "orchestrator":
                assert "nvidia.com/gpu" not in resources.get("limits", {})
                continue
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1, name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
            if deployment["spec"]["replicas"] > 1 or overlay == "replicas":
                spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
                assert (
                    spread["kubernetes.io/hostname"]["labelSelector"]["matchLabels"]
                    == deployment["spec"]["selector"]["matchLabels"]
                ), name


def test_every_stage_has_a_disruption_budget_and_a_headless_service(overlays, in_pod):
    for overlay, docs in overlays.items():
        deployments = _by_kind(docs, "Deployment")
        services = _by_kind(docs, "Service")
        budgets = _by_kind(docs, "PodDisruptionBudget")
        orchestrators = [d for d in deployments.values() if _component(d) == "orchestrator"]
        for orchestrator in orchestrators:
            _, options = in_pod(orchestrator, entrypoints()["orchestrator"] + _container(orchestrator)["args"])
            for stage, port in STAGE_PORTS.items():
                service = services[f"fluxmesh-{stage}"]
                assert service["spec"]["clusterIP"] == "None"  # headless: one DNS record per ready pod
                pod_labels = deployments[f"fluxmesh-{stage}"]["spec"]["template"]["metadata"]["labels"]
                assert service["spec"]["selector"].items() <= pod_labels.items()
                assert [p["port"] for p in service["spec"]["ports"]] == [port]
                namespace = service["metadata"]["namespace"]
                assert getattr(options, stage) == f"dns:///fluxmesh-{stage}.{namespace}.svc.cluster.local:{port}"
                budget = budgets[f"fluxmesh-{stage}"]["spec"]
                assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
                assert budget["maxUnavailable"] == 1
        public = services["fluxmesh"]
        assert public["spec"]["ports"][0]["port"] == 50050 and "clusterIP" not in public["spec"]
        assert overlay == "sequential" or orchestrators, overlay


def _env_secret(container: dict, variable: str) -> str:
    (entry,) = [e for e in container["env"] if e["name"] == variable]
    ref = entry["valueFrom"]["secretKeyRef"]
    assert not ref.get("optional"), variable  # a missing secret stops the pod instead of opening it
    return ref["name"]


def test_stages_demand_the_stage_token_that_only_the_orchestrator_holds(overlays):
    for docs in overlays.values():
        for deployment in _by_kind(docs, "Deployment").values():
            container = _container(deployment)
            argv = container["args"]
            if _component(deployment) in STAGE_PORTS:
                assert _env_secret(container, option(argv, "--token-env")) == "fluxmesh-stage-token"
            elif _component(deployment) == "orchestrator":
                assert _env_secret(container, option(argv, "--stage-token-env")) == "fluxmesh-stage-token"
            if _component(deployment) in ("orchestrator", "sequential"):  # the public side: client tokens
                mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
                volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
                token_file = Path(option(argv, "--token-file"))
                (volume,) = [n for n, path in mounts.items() if token_file.parent == Path(path)]
                assert volumes[volume]["secret"]["secretName"] == "fluxmesh-client-tokens"


def _selects(selector: dict, labels: dict) -> bool:
    return selector.get("matchLabels", {}).items() <= labels.items()


def test_network_policies_let_only_the_orchestrator_reach_the_stages(overlays):
    for docs in overlays.values():
        policies = list(_by_kind(docs, "NetworkPolicy").values())
        deny = [p for p in policies if p["spec"]["podSelector"] == {}]
        assert deny and deny[0]["spec"]["policyTypes"] == ["Ingress"] and "ingress" not in deny[0]["spec"]
        for name, deployment in _by_kind(docs, "Deployment").items():
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            ports = {p["name"]: p["containerPort"] for p in _container(deployment)["ports"]}
            rules = [
                rule
                for p in policies
                if _selects(p["spec"]["podSelector"], labels)
                for rule in p["spec"].get("ingress", [])
            ]
            grpc_rules = [r for r in rules if {"port": "grpc"} in r["ports"]]
            assert grpc_rules, name
            if _component(deployment) in STAGE_PORTS:
                for rule in grpc_rules:
                    (peer,) = rule["from"]
                    assert peer == {
                        "podSelector": {
                            "matchLabels": {
                                "app.kubernetes.io/name": "fluxmesh",
                                "app.kubernetes.io/component": "orchestrator",
                            }
                        }
                    }
            assert set(ports) == {"grpc", "metrics"}
            for rule in rules:
                assert {p["port"] for p in rule["ports"]} <= set(ports), name  # named ports that exist


def _registered_metrics() -> dict[str, set[str]]:
    """Every metric fluxmesh's processes export: name -> label names."""
    from prometheus_client import REGISTRY

    import fluxmesh.orchestrator.metrics  # importing registers them
    import fluxmesh.rpc.metrics
    import fluxmesh.services.runtime.metrics  # noqa: F401

    return {
        family.name: {label for sample in family.samples for label in sample.labels}
        | set(getattr(REGISTRY._names_to_collectors.get(family.name), "_labelnames", ()))
        for family in REGISTRY.collect()
    }


def test_autoscalers_scale_each_stage_on_metrics_fluxmesh_exports(overlays):
    docs = overlays["replicas"]
    deployments = _by_kind(docs, "Deployment")
    scaled = _by_kind(docs, "ScaledObject")
    assert set(scaled) == {f"fluxmesh-{stage}" for stage in STAGE_PORTS}
    registered = _registered_metrics()
    for name, scaler in scaled.items():
        assert scaler["apiVersion"] == "keda.sh/v1alpha1"
        spec = scaler["spec"]
        assert spec["scaleTargetRef"]["name"] in deployments and spec["scaleTargetRef"]["name"] == name
        assert 1 <= spec["minReplicaCount"] <= deployments[name]["spec"]["replicas"] <= spec["maxReplicaCount"]
        behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 600  # a GPU pod takes minutes to load
        queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
        assert len(queries) == 2 and all(float(t["metadata"]["threshold"]) > 0 for t in spec["triggers"])
        for query in queries:
            for metric_name, labels in re.findall(r"(fluxmesh_\w+)\{([^}]*)\}", query):
                assert metric_name in registered, metric_name
                used = {label.split("=")[0].strip() for label in labels.split(",")}
                assert used <= registered[metric_name] | {"namespace", "pod"}, (metric_name, used)
        stage = name.removeprefix("fluxmesh-")
        service = {"encoder": "fluxmesh.v1.TextEncoder", "denoiser": "fluxmesh.v1.Denoiser", "vae": "fluxmesh.v1.Vae"}
        assert f'service="{service[stage]}"' in queries[0], queries[0]
    (monitor,) = _by_kind(docs, "PodMonitor").values()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["podMetricsEndpoints"][0]["honorLabels"] is True  # keeps our `service` label
    for deployment in deployments.values():
        assert _selects(monitor["spec"]["selector"], deployment["spec"]["template"]["metadata"]["labels"])
        assert "--metrics-port" in _container(deployment)["args"]


def test_the_tls_component_gives_stages_mutual_tls_with_certificates_that_match(overlays, in_pod):
    docs = overlays["replicas"]
    certificates = {c["spec"]["secretName"]: c for c in _by_kind(docs, "Certificate").values()}
    issuers = _by_kind(docs, "Issuer")
    for certificate in certificates.values():
        assert certificate["spec"]["issuerRef"]["name"] in issuers
    for name, deployment in _by_kind(docs, "Deployment").items():
        container = _container(deployment)
        argv = container["args"]
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}

        def secret_of(path: str, mounts=mounts, volumes=volumes) -> dict:
            secret = volumes[mounts[str(Path(path).parent)]]["secret"]["secretName"]
            assert Path(path).name in ("tls.crt", "tls.key", "ca.crt")  # cert-manager's keys
            return certificates[secret]["spec"]

        if _component(deployment) in STAGE_PORTS:
            _, options = in_pod(deployment, entrypoints()["stages"] + argv)
            assert options.security.require_client_cert and options.security.ca
            names = secret_of(option(argv, "--tls-cert"))["dnsNames"]
            assert f"fluxmesh-{_component(deployment)}.fluxmesh.svc.cluster.local" in names
            assert "localhost" in names  # the probes dial the pod itself ...
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):  # ... with a client certificate
                command = container[probe]["exec"]["command"]
                assert {"--tls-ca", "--tls-cert", "--tls-key"} <= set(command), (name, probe)
        else:
            assert "client auth" in secret_of(option(argv, "--stage-tls-cert"))["usages"]
            assert option(argv, "--stage-tls-ca") == option(argv, "--tls-cert").replace("tls.crt", "ca.crt")
            assert "localhost" in secret_of(option(argv, "--tls-cert"))["dnsNames"]


def test_the_cli_runner_here_rejects_what_the_cli_rejects(cli):
    """The checks above can fail: a wrong flag, value or missing option does not run."""
    for argv in (
        ["fluxmesh", "serve", "denoiser", "--model", "m", "--prot", "1"],
        ["fluxmesh", "serve", "vae", "--model", "m", "--port", "fifty"],
        ["fluxmesh", "serve", "orchestrator", "--release-to", "nowhere"],
        ["fluxmesh", "serve", "encoder"],
        ["fluxmesh", "helth", "localhost:1"],
    ):
        result = cli(argv, ok=False)
        assert result.exit_code == 2, (argv, result.output)


async def test_servers_export_calls_in_flight_for_the_autoscalers():
    """fluxmesh_rpc_in_flight counts a call from receipt to its end (here a Health.Watch stream,
    which stays open until its client leaves), as a stage's Denoise counts while it computes."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from prometheus_client import REGISTRY

    from fluxmesh.rpc.server import Server

    def in_flight() -> float:
        value = REGISTRY.get_sample_value(
            "fluxmesh_rpc_in_flight", {"service": "grpc.health.v1.Health", "method": "Watch"}
        )
        return value or 0.0

    server = Server([], address="127.0.0.1:0")
    await server.start()
    before = in_flight()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
            first = await watch.read()
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            assert in_flight() == before + 1
            watch.cancel()
        for _ in range(100):  # the server sees the cancellation shortly after
            if in_flight() == before:
                break
            await asyncio.sleep(0.02)
        assert in_flight() == before
    finally:
        await server.stop(0)
