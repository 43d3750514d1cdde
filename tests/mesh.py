"""A fluxmesh deployment a test may break: fixed ports, one log file and one metrics port per
process, and any process started, killed or restarted (on the same port) on demand.

The session clusters in conftest.py are shared and must never be broken; destructive tests
(SIGKILL, SIGTERM, restarts) build one of these instead.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2

from conftest import STAGE_FLAGS
from fluxmesh.cli.lifeline import child_environment
from fluxmesh.cli.supervisor import STAGES, Child, Cluster, free_port, health_status

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Mesh:
    def __init__(
        self,
        model: Path,
        logs: Path,
        *,
        extra_args: dict[str, list[str]] | None = None,
        env: dict[str, str] | None = None,
        health_credentials: dict[str, grpc.ChannelCredentials] | None = None,
    ):
        self.model = model
        self.logs = logs
        self.ports = {name: free_port() for name in (*STAGES, "orchestrator")}
        self.metrics_ports = {name: free_port() for name in (*STAGES, "orchestrator")}
        self.extra_args = extra_args or {}  # per process name
        self.env = env or {}
        self.health_credentials = health_credentials or {}  # per process name, for TLS servers
        self.cluster = Cluster()

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def args(self, name: str) -> list[str]:
        common = [
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports[name]),
            "--metrics-port",
            str(self.metrics_ports[name]),
        ]
        if name == "orchestrator":
            return [
                "serve",
                "orchestrator",
                *common,
                *[f"--{stage}={self.address(stage)}" for stage in STAGES],
                *self.extra_args.get(name, []),
            ]
        return ["serve", name, "--model", str(self.model), *common, *STAGE_FLAGS, *self.extra_args.get(name, [])]

    def start(self, name: str) -> Child:
        """Start (or restart, on the same port) one process, its output appended to its log."""
        log = open(self.logs / f"{name}.log", "ab")
        process = subprocess.Popen(
            [sys.executable, "-m", "fluxmesh.cli", *self.args(name)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=child_environment(self.env),
        )
        log.close()  # the child holds its own descriptor
        child = Child(name, self.address(name), process)
        self.cluster.children.append(child)
        return child

    def process(self, name: str) -> subprocess.Popen:
        return [c for c in self.cluster.children if c.name == name][-1].process

    def health(self, name: str = "orchestrator") -> int | None:
        return health_status(self.address(name), timeout=1.0, credentials=self.health_credentials.get(name))

    def wait_health(self, status: int, name: str = "orchestrator", timeout: float = 120.0) -> float:
        """Wait until `name` reports `status`; returns the seconds it took."""
        started = time.monotonic()
        while self.health(name) != status:
            assert self.process(name).poll() is None, (
                f"{name} exited with {self.process(name).returncode}; its log ends:\n{self.log(name)[-3000:]}"
            )
            assert time.monotonic() - started < timeout, f"{name} not {status} after {timeout}s"
            time.sleep(0.1)
        return time.monotonic() - started

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def stop(self) -> None:
        self.cluster.stop()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample in Prometheus text format (None when absent)."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        key, _, value = line.rpartition(" ")
        sample, _, label_text = key.partition("{")
        if sample != name:
            continue
        found = dict(part.split("=", 1) for part in label_text.rstrip("}").split(",") if "=" in part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return None
