"""fluxmesh across hosts: every process on its own simulated host (tests/netns.py), TLS on every
hop, mutual TLS and the stage token between orchestrator and stages, client tokens in front.

Hosts: `client` (where the SDK runs), two orchestrators, `encoder`, `denoiser-a`, `denoiser-b`,
`vae`, each with its own address in 198.18.0.0/24 and a 1 Gbit/s link. The two denoisers sit
behind one name, `denoiser.fluxmesh.test`, that resolves to both (as a headless Service does):
`orchestrator` dials `dns:///denoiser.fluxmesh.test:50052` (gRPC's round robin over the name),
`orchestrator-list` dials both hosts by name, comma-separated (fluxmesh's own replica set).
Through each in turn, one denoiser's cable is cut in the middle of a request and plugged back in.

The SDK runs in the client host through a small driver process (the test process itself stays
in the machine's own network): it reads one JSON command a line and answers JSON lines.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import netns
from certs import Authority
from conftest import STAGE_FLAGS
from factories import PROMPT
from fluxmesh.cli.lifeline import child_environment
from mesh import wait_until

REASON = netns.unavailable()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"simulated hosts: {REASON}")

DOMAIN = "fluxmesh.test"
PORTS = {"encoder": 50051, "denoiser": 50052, "vae": 50053, "orchestrator": 50050}
METRICS_PORT = 9100
STAGE_TOKEN = "stage-token-between-hosts"
CLIENT_TOKEN = "client-token-for-the-public-side"
# each orchestrator host and how it names the two denoisers
ORCHESTRATORS = {
    "orchestrator": f"dns:///denoiser.{DOMAIN}:50052",
    "orchestrator-list": f"denoiser-a.{DOMAIN}:50052,denoiser-b.{DOMAIN}:50052",
}

DRIVER = r"""
import json, sys, time
from pathlib import Path
import grpc
from fluxmesh.client import Client, FluxmeshError, Step, Result

def say(**message):
    print(json.dumps(message), flush=True)

for line in sys.stdin:
    command = json.loads(line)
    credentials = grpc.ssl_channel_credentials(Path(command["ca"]).read_bytes())
    started = time.monotonic()
    try:
        with Client(command["address"], token=command.get("token"), credentials=credentials,
                    timeout=command["timeout"]) as client:
            for event in client.stream(command["prompt"], width=command["size"], height=command["size"],
                                       steps=command["steps"], seed=command["seed"]):
                if isinstance(event, Step):
                    say(event="step", step=event.step)
                elif isinstance(event, Result):
                    say(event="result", seconds=time.monotonic() - started, size=list(event.image.size),
                        pixels=event.image_data[0].hex())
    except FluxmeshError as error:
        say(event="error", code=error.code.name, message=error.message, seconds=time.monotonic() - started)
"""


class Driver:
    """The SDK in the client host: `generate(...)` yields its events as dicts."""

    def __init__(self, host: netns.Host, ca: Path):
        self.ca = ca
        self.host = host
        self.process = host.popen(
            [sys.executable, "-c", DRIVER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None,
            env=child_environment({}),
            text=True,
            bufsize=1,
        )
        self.lines: queue.Queue[dict] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.put(json.loads(line))

    def send(self, **command) -> None:
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()

    def next(self, timeout: float) -> dict:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"the client said nothing for {timeout} s")

    def generate(
        self,
        *,
        seed: int,
        steps: int = 2,
        size: int = 64,
        timeout: float = 60,
        token: str | None = CLIENT_TOKEN,
        via: str = "orchestrator",
    ):
        self.send(
            op="generate",
            address=f"{via}.{DOMAIN}:{PORTS['orchestrator']}",
            ca=str(self.ca),
            token=token,
            prompt=PROMPT,
            seed=seed,
            steps=steps,
            size=size,
            timeout=timeout,
        )
        while True:
            event = self.next(timeout + 10)
            yield event
            if event["event"] != "step":
                return

    def result(self, **kwargs) -> dict:
        *_, last = self.generate(**kwargs)
        return last


FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=3).read().decode())"


def metric(client: netns.Host, host: netns.Host, name: str, **labels: str) -> float | None:
    """A metric of `host`'s process as Prometheus would scrape it (from the client host); None when
    its endpoint does not answer, 0 when no call with these labels happened yet."""
    reply = client.run([sys.executable, "-c", FETCH, f"http://{host.address}:{METRICS_PORT}/metrics"], timeout=20)
    if reply.returncode != 0:
        return None
    for line in reply.stdout.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _wait_serving(host: netns.Host, port: int, tls: list[str], timeout: float = 240) -> None:
    """Asked from inside the host's namespace (`fluxmesh health` there), once a second."""
    address = f"{host.name}.{DOMAIN}:{port}"
    probe = [sys.executable, "-m", "fluxmesh.cli", "health", address, *tls]
    wait_until(lambda: host.run(probe).returncode == 0, timeout, what=f"{host.name} SERVING", interval=1.0)


@dataclass
class Deployment:
    network: netns.Network
    hosts: dict[str, netns.Host]
    driver: Driver
    ca: Authority
    work: Path


@pytest.fixture(scope="module")
def cluster(dev_model, tmp_path_factory):
    """Six hosts, five servers, TLS everywhere."""
    work = tmp_path_factory.mktemp("multihost")
    ca = Authority(work, "cluster")
    network = netns.Network()
    try:
        hosts = {
            name: network.host(name, rate="1gbit")
            for name in ("client", *ORCHESTRATORS, "encoder", "denoiser-a", "denoiser-b", "vae")
        }
        for host in hosts.values():  # each host answers to NAME.fluxmesh.test too
            network.alias(f"{host.name}.{DOMAIN}", [host])
        network.alias(f"denoiser.{DOMAIN}", [hosts["denoiser-a"], hosts["denoiser-b"]])
        tokens = work / "client-tokens"
        tokens.write_text(CLIENT_TOKEN + "\n")
        stage_token = work / "stage-token"
        stage_token.write_text(STAGE_TOKEN + "\n")
        orchestrator_client = ca.issue("orchestrator-client", server=False)
        env = child_environment({"GRPC_DNS_RESOLVER": "native"})  # /etc/hosts, as the cluster's DNS
        for name, host in hosts.items():
            if name == "client":
                continue
            stage = "denoiser" if name.startswith("denoiser") else "orchestrator" if name in ORCHESTRATORS else name
            names = [f"{name}.{DOMAIN}", "localhost"] + ([f"denoiser.{DOMAIN}"] if stage == "denoiser" else [])
            server = ca.issue(name, server=True, hosts=names)
            common = [
                "--host",
                host.address,
                "--port",
                str(PORTS[stage]),
                "--metrics-port",
                str(METRICS_PORT),
                "--tls-cert",
                str(server.cert),
                "--tls-key",
                str(server.key),
            ]
            if stage == "orchestrator":
                argv = [
                    "serve",
                    "orchestrator",
                    *common,
                    "--token-file",
                    str(tokens),
                    "--encoder",
                    f"encoder.{DOMAIN}:50051",
                    "--vae",
                    f"vae.{DOMAIN}:50053",
                    "--denoiser",
                    ORCHESTRATORS[name],
                    "--stage-tls-ca",
                    str(ca.pem),
                    "--stage-tls-cert",
                    str(orchestrator_client.cert),
                    "--stage-tls-key",
                    str(orchestrator_client.key),
                    "--stage-token-file",
                    str(stage_token),
                ]
            else:
                argv = [
                    "serve",
                    stage,
                    "--model",
                    str(dev_model),
                    *common,
                    *STAGE_FLAGS,
                    "--tls-ca",
                    str(ca.pem),
                    "--require-client-cert",
                    "--token-file",
                    str(stage_token),
                ]
            host.popen([sys.executable, "-m", "fluxmesh.cli", *argv], log=work / f"{name}.log", env=env)
        probe = [
            "--tls-ca",
            str(ca.pem),
            "--tls-cert",
            str(orchestrator_client.cert),
            "--tls-key",
            str(orchestrator_client.key),
        ]
        for name in ("encoder", "denoiser-a", "denoiser-b", "vae"):
            _wait_serving(hosts[name], PORTS["denoiser" if name.startswith("denoiser") else name], probe)
        for name in ORCHESTRATORS:
            _wait_serving(hosts[name], PORTS["orchestrator"], ["--tls-ca", str(ca.pem)])
        driver = Driver(hosts["client"], ca.pem)
        yield Deployment(network, hosts, driver, ca, work)
        driver.process.stdin.close()
    finally:
        network.close()
        for log in sorted(work.glob("*.log")):  # shown when a test failed
            tail = log.read_text(errors="replace").splitlines()[-15:]
            print(f"--- {log.name}\n" + "\n".join(tail))


def test_a_generation_across_hosts_with_tls_mutual_tls_and_tokens(cluster):
    hosts, driver, ca = cluster.hosts, cluster.driver, cluster.ca
    result = driver.result(seed=3)
    assert result["event"] == "result" and result["size"] == [64, 64], result
    again = driver.result(seed=3)
    assert again["pixels"] == result["pixels"]  # same seed, same image, whichever denoiser ran it

    refused = driver.result(seed=3, token=None)
    assert refused["event"] == "error" and refused["code"] == "UNAUTHENTICATED", refused
    # A stage on another host refuses a client without a certificate from the cluster's CA,
    # before any token is looked at: the handshake itself fails.
    client = hosts["client"]
    health = [sys.executable, "-m", "fluxmesh.cli", "health", f"encoder.{DOMAIN}:50051", "--tls-ca", str(ca.pem)]
    assert client.run(health).returncode == 1
    rogue = Authority(cluster.work, "rogue").issue("intruder", server=False)
    assert client.run([*health, "--tls-cert", str(rogue.cert), "--tls-key", str(rogue.key)]).returncode == 1


def _busy_denoiser(driver: Driver, hosts: dict) -> str:
    """The denoiser host with a Denoise call in flight (fluxmesh_rpc_in_flight, as autoscalers see it)."""
    busy = [
        name
        for name in ("denoiser-a", "denoiser-b")
        if metric(
            hosts["client"], hosts[name], "fluxmesh_rpc_in_flight", service="fluxmesh.v1.Denoiser", method="Denoise"
        )
    ]
    assert len(busy) == 1, busy
    return busy[0]


def _denoised(driver: Driver, host: netns.Host) -> float:
    """Denoise calls the host's denoiser completed."""
    value = metric(
        driver.host, host, "fluxmesh_rpc_handled_total", service="fluxmesh.v1.Denoiser", method="Denoise", code="OK"
    )
    assert value is not None, f"{host.name}'s metrics did not answer"
    return value


@pytest.mark.parametrize("via", list(ORCHESTRATORS))
def test_a_cut_denoiser_host_fails_its_request_within_the_deadline_then_rejoins(cluster, via):
    network, hosts, driver = cluster.network, cluster.hosts, cluster.driver
    deadline = 45.0
    events = driver.generate(seed=11, steps=100, size=256, timeout=deadline, via=via)
    first = next(events)
    assert first["event"] == "step", first
    cut = _busy_denoiser(driver, hosts)
    live = "denoiser-b" if cut == "denoiser-a" else "denoiser-a"
    network.cut(hosts[cut])
    cut_at = time.monotonic()
    try:
        *steps, last = events
        # It was stepping on the host that vanished: not re-run elsewhere (its progress already
        # reached the client), so it must end UNAVAILABLE naming the stage, inside its deadline.
        assert last["event"] == "error" and last["code"] == "UNAVAILABLE", last
        assert "denoiser" in last["message"]
        assert time.monotonic() - cut_at < deadline
        print(
            f"{via}: cut after step {first['step'] + len(steps)}: UNAVAILABLE {time.monotonic() - cut_at:.1f} s later"
        )

        before = _denoised(driver, hosts[live])
        for seed in range(3):  # the next requests go to the live replica and succeed
            result = driver.result(seed=20 + seed, timeout=30, via=via)
            assert result["event"] == "result", result
        assert _denoised(driver, hosts[live]) == before + 3
    finally:
        network.restore(hosts[cut])

    # Plugged back in: the connection is made again and the name's round robin sends it calls.
    start = _denoised(driver, hosts[cut])
    for seed in range(30):
        assert driver.result(seed=40 + seed, timeout=30, via=via)["event"] == "result"
        if _denoised(driver, hosts[cut]) > start:
            print(f"{cut} rejoined: a call {seed + 1} request(s) after its link came back")
            break
        time.sleep(1)
    else:
        pytest.fail(f"{cut} got no call in 30 requests after its link came back")


def test_links_are_shaped_and_addresses_stay_in_the_benchmarking_range(cluster):
    for host in cluster.hosts.values():
        assert re.fullmatch(r"198\.18\.0\.\d+", host.address)
        shaped = host.run(["tc", "qdisc", "show", "dev", "eth0"]).stdout
        assert "tbf" in shaped and "rate 1Gbit" in shaped, shaped
