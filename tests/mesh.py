"""The one way tests start fluxmesh processes, and the one way they wait.

`Mesh` starts real `fluxmesh serve ...` processes on loopback: the three stages of a model and an
orchestrator in front of them (`start_all()`), or any of them one by one: an orchestrator in
front of stages that run elsewhere (`stages=`, with their `stage_token`), replicas
(`start("denoiser-b")`: a process name is its kind, or kind-suffix), a process killed and
restarted on its port. Each process gets fixed ports, a metrics port and a log file; a failed
wait quotes the log. Like `fluxmesh up` (fluxmesh.cli.supervisor.start_local), the stages demand
a random stage token that only the orchestrator is handed, in the environment.

The session meshes in conftest.py are shared and must never be broken; destructive tests
(SIGKILL, SIGTERM, restarts) build one of their own.

`wait_until`, `wait_for_health` and `wait_settled` are the waits: they poll a condition with a
deadline, never sleep a guessed time.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2

from conftest import STAGE_FLAGS, stage_access, stage_metadata
from fluxmesh.cli.lifeline import child_environment
from fluxmesh.cli.supervisor import STAGES, Child, Cluster, free_port, health_status
from fluxmesh.rpc.security import STAGE_TOKEN_ENV

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

T = TypeVar("T")


def _status_name(status: int | None) -> str:
    return "UNREACHABLE" if status is None else health_pb2.HealthCheckResponse.ServingStatus.Name(status)


def wait_until(
    condition: Callable[[], object],
    timeout: float = 60.0,
    *,
    what: str = "the condition",
    interval: float = 0.1,
    alive: Callable[[], str | None] | None = None,
) -> float:
    """Poll `condition` until it is true; returns the seconds it took. Fails naming `what` after
    `timeout`, or at once when `alive` returns a reason (e.g. the process under test exited)."""
    started = time.monotonic()
    while not condition():
        reason = alive() if alive is not None else None
        assert reason is None, f"{what}: {reason}"
        assert time.monotonic() - started < timeout, f"{what}: not after {timeout:.0f}s"
        time.sleep(interval)
    return time.monotonic() - started


def exited(process: subprocess.Popen, output: Callable[[], str] | None = None) -> Callable[[], str | None]:
    """For `wait_until(alive=)`: why waiting on `process` is pointless (it exited), or None."""

    def reason() -> str | None:
        if process.poll() is None:
            return None
        return f"exited with {process.returncode}" + (f"; its output ends:\n{output()[-3000:]}" if output else "")

    return reason


def wait_for_health(
    address: str,
    status: int = SERVING,
    *,
    timeout: float = 120.0,
    credentials: grpc.ChannelCredentials | None = None,
    process: subprocess.Popen | None = None,
    output: Callable[[], str] | None = None,
) -> float:
    """Wait until `address` reports `status` on grpc.health.v1 (a `process` that exits first fails
    the wait, quoting `output()`); returns the seconds it took."""
    return wait_until(
        lambda: health_status(address, timeout=1.0, credentials=credentials) == status,
        timeout,
        what=f"{address} {_status_name(status)}",
        alive=exited(process, output) if process is not None else None,
    )


def wait_settled(read: Callable[[], T], *, quiet: float = 1.0, timeout: float = 15.0, what: str = "it") -> T:
    """`read()` once it stopped changing for `quiet` seconds (e.g. a stage's step count after a
    cancellation); fails when it keeps changing for `timeout`."""
    started = time.monotonic()
    last, since = read(), time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() - started < timeout, f"{what} kept changing for {timeout:.0f}s"
        time.sleep(0.1)
        now = read()
        if now != last:
            last, since = now, time.monotonic()
    return last


class Mesh:
    def __init__(
        self,
        model: Path | None = None,
        logs: Path | None = None,
        *,
        stages: dict[str, str] | None = None,
        stage_token: str | None = None,
        stage_credential: bool = True,
        threaded: bool = False,
        stage_args: list[str] | tuple[str, ...] = (),
        extra_args: dict[str, list[str]] | None = None,
        env: dict[str, str] | None = None,
        health_credentials: dict[str, grpc.ChannelCredentials] | None = None,
    ):
        """`stages`: stage -> address(es) of stages running elsewhere (other keys are ignored);
        `stage_token`: what those stages demand (default: a new random one, as start_local makes);
        `stage_credential=False`: no stage token at all (the test passes its own credentials);
        `threaded`: no STAGE_FLAGS (torch's threads, or a CPU share from `env`); `stage_args`:
        for every stage; `extra_args`: per process name; `health_credentials`: per process name,
        for TLS servers."""
        self.model = model
        self.logs = logs or Path(tempfile.mkdtemp(prefix="fluxmesh-test-logs-"))
        self.stages = {stage: address for stage, address in (stages or {}).items() if stage in STAGES}
        self.stage_token = (stage_token or secrets.token_urlsafe(32)) if stage_credential else None
        self.stage_args = [*([] if threaded else STAGE_FLAGS), *stage_args]
        self.extra_args = extra_args or {}
        self.env = env or {}
        self.health_credentials = health_credentials or {}
        self.ports: dict[str, int] = {}
        self.metrics_ports: dict[str, int] = {}
        self.cluster = Cluster(stage_token=self.stage_token)

    # -- where things are ---------------------------------------------------------------------

    def address_of(self, name: str) -> str:
        """Where process `name` listens (its ports are chosen on first use, kept across restarts)."""
        if name not in self.ports:
            self.ports[name], self.metrics_ports[name] = free_port(), free_port()
        return f"127.0.0.1:{self.ports[name]}"

    @property
    def address(self) -> str:
        """The orchestrator's address (what clients call)."""
        return self.address_of("orchestrator")

    @property
    def children(self) -> list[Child]:
        return self.cluster.children

    def stage_metadata(self) -> tuple[tuple[str, str], ...]:
        """Metadata for calling this mesh's stages directly, as its orchestrator does."""
        assert self.stage_token is not None, "this mesh's stages demand no stage token"
        return stage_metadata(self.stage_token)

    # -- starting and stopping ----------------------------------------------------------------

    @staticmethod
    def kind(name: str) -> str:
        return name if name in (*STAGES, "orchestrator") else name.rpartition("-")[0]

    def args(self, name: str) -> list[str]:
        kind = self.kind(name)
        self.address_of(name)  # gives it its ports
        common = [
            "--host",
            "127.0.0.1",
            "--port",
            str(self.ports[name]),
            "--metrics-port",
            str(self.metrics_ports[name]),
        ]
        if kind == "orchestrator":
            stages = {stage: self.stages.get(stage) or self.address_of(stage) for stage in STAGES}
            token = stage_access(self.stage_token)[0] if self.stage_token else []
            return [
                "serve",
                "orchestrator",
                *common,
                *[f"--{stage}={stages[stage]}" for stage in STAGES],
                *token,
                *self.extra_args.get(name, []),
            ]
        assert kind in STAGES, f"{name}: not a stage, a stage replica (stage-suffix) or the orchestrator"
        assert self.model is not None, f"{name}: a stage needs a model"
        token = ["--token-env", STAGE_TOKEN_ENV] if self.stage_token else []
        return [
            "serve",
            kind,
            "--model",
            str(self.model),
            *common,
            *token,
            *self.stage_args,
            *self.extra_args.get(name, []),
        ]

    def start(self, name: str) -> Child:
        """Start (or restart, on the same port) one process, its output appended to its log."""
        env = {**self.env, **({STAGE_TOKEN_ENV: self.stage_token} if self.stage_token else {})}
        with open(self.logs / f"{name}.log", "ab") as log:  # the child holds its own descriptor
            process = subprocess.Popen(
                [sys.executable, "-m", "fluxmesh.cli", *self.args(name)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_environment(env),
            )
        child = Child(name, self.address_of(name), process)
        self.cluster.children.append(child)
        return child

    def start_all(self, *names: str, timeout: float = 180.0) -> Mesh:
        """Start `names` (default: the stages not given in `stages`, then the orchestrator) at
        once; returns once all are SERVING, or stops everything and fails quoting the log."""
        names = names or (*(stage for stage in STAGES if stage not in self.stages), "orchestrator")
        try:
            for name in names:
                self.start(name)
            deadline = time.monotonic() + timeout
            for name in names:
                self.wait_health(SERVING, name, timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.stop()
            raise
        return self

    def process(self, name: str) -> subprocess.Popen:
        """The latest process started as `name`."""
        return [c for c in self.cluster.children if c.name == name][-1].process

    def stop(self) -> None:
        self.cluster.stop()

    def __enter__(self) -> Mesh:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what they say ------------------------------------------------------------------------

    def health(self, name: str = "orchestrator") -> int | None:
        return health_status(self.address_of(name), timeout=1.0, credentials=self.health_credentials.get(name))

    def wait_health(self, status: int = SERVING, name: str = "orchestrator", timeout: float = 120.0) -> float:
        """Wait until `name` reports `status`; returns the seconds it took."""
        return wait_for_health(
            self.address_of(name),
            status,
            timeout=timeout,
            credentials=self.health_credentials.get(name),
            process=self.process(name),
            output=lambda: self.log(name),
        )

    def wait_answering(self, name: str = "orchestrator", timeout: float = 120.0) -> float:
        """Wait until `name` answers health checks at all (SERVING or not)."""
        return wait_until(
            lambda: self.health(name) is not None,
            timeout,
            what=f"{name} answering",
            alive=exited(self.process(name), lambda: self.log(name)),
        )

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def monitor_saw(self, stage: str, state: str = "SERVING", orchestrator: str = "orchestrator") -> bool:
        """Whether the orchestrator's stage monitor logged `stage` turning `state` (SERVING or
        down): what a test waits for instead of sleeping through monitor rounds."""
        address = self.stages.get(stage) or self.address_of(stage)
        return f"{stage} stage at {address} is {state}" in self.log(orchestrator)

    def metrics(self, name: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_ports[name]}/metrics", timeout=5) as reply:
            return reply.read().decode()

    def monitor_probes(self, stage: str) -> float:
        """How many stage-monitor probes (Residency/Status) process `stage` of this mesh answered:
        it grows by one per orchestrator monitor round, so a test waits on rounds by counting."""
        text = self.metrics(stage)
        return sum(
            metric(text, "fluxmesh_rpc_handled_total", service="fluxmesh.v1.Residency", method="Status", code=code) or 0
            for code in ("OK", "UNAUTHENTICATED")
        )

    def wait_monitor_rounds(self, stage: str, rounds: int = 2, timeout: float = 30.0) -> None:
        """Wait until the orchestrator's monitor probed `stage` `rounds` more times: with two, one
        whole round began and ended after this call (rounds run one after another)."""
        start = self.monitor_probes(stage)
        wait_until(lambda: self.monitor_probes(stage) >= start + rounds, timeout, what=f"{rounds} monitor rounds")


# -- what `fluxmesh up` started (tests of the CLI's own start path look into it) -------------------


def children_of(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(child) for child in out.split()]


def argv_of(pid: int) -> list[str]:
    return [arg.decode() for arg in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]


def up_stages(pid: int) -> dict[str, tuple[int, str]]:
    """The stage processes `fluxmesh up` (process `pid`) started: {"encoder": (pid, "127.0.0.1:PORT"), ...}."""
    found = {}
    for child in children_of(pid):
        args = argv_of(child)
        if "serve" in args and args[args.index("serve") + 1] in STAGES:
            found[args[args.index("serve") + 1]] = (child, f"127.0.0.1:{args[args.index('--port') + 1]}")
    return found


def up_stage_token(pid: int) -> str:
    """The stage token `fluxmesh up` (process `pid`) handed its children: in their environment
    (readable by their own user only), never in argv."""
    child = next(iter(up_stages(pid).values()))[0]
    environ = dict(line.split(b"=", 1) for line in Path(f"/proc/{child}/environ").read_bytes().split(b"\0") if line)
    return environ[STAGE_TOKEN_ENV.encode()].decode()


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
