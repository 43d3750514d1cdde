"""Run the four fluxmesh processes locally as children and keep them on a short leash.

`fluxmesh up` and `fluxmesh demo` use it: start encoder, denoiser and vae on free loopback
ports, then the orchestrator pointed at them, wait until each reports SERVING on
grpc.health.v1, and stop them all on exit, Ctrl-C or SIGTERM. Children also get
PR_SET_PDEATHSIG on Linux (lifeline.py) so they die with a parent killed by SIGKILL: no orphans.

Loopback is not a wall: any local process can reach the stages' ports. So each start makes a
random stage token that only these children know (in their environment, never in argv, which
/proc shows to every user): the stages demand it, the orchestrator sends it, and nothing else
drives the stages past the orchestrator's tokens, queue and priority limits.
"""

from __future__ import annotations

import logging
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from fluxmesh.cli.lifeline import child_environment
from fluxmesh.cli.ports import free_port
from fluxmesh.contract import Stage
from fluxmesh.rpc.cores import CPU_SHARE_ENV, cpu_shares, host_cores
from fluxmesh.rpc.security import STAGE_TOKEN_ENV

log = logging.getLogger(__name__)

STAGES = tuple(Stage)
LOOPBACK = "127.0.0.1"


def reachable(host: str) -> str:
    """Where this machine reaches a server listening on `host` (a wildcard: over loopback)."""
    if host in ("0.0.0.0", "", "[::]", "::"):
        return LOOPBACK if host in ("0.0.0.0", "") else "[::1]"
    return host


def health_status(
    address: str, service: str = "", timeout: float = 2.0, credentials: grpc.ChannelCredentials | None = None
) -> int | None:
    """The grpc.health.v1 status of `address` (None when it does not answer)."""
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
        except grpc.RpcError:
            return None
    return reply.status


class StartFailed(RuntimeError):
    """A child exited before it was SERVING (its own error is in its output)."""


@dataclass
class Child:
    name: str
    address: str
    process: subprocess.Popen
    # A TLS server whose certificate this process cannot verify (fluxmesh up holds the server's
    # certificate, not necessarily its CA): it counts as up once it accepts connections. Its
    # health mirrors the stages', which were checked SERVING first.
    probe_tcp_only: bool = False
    # What started it, so that fluxmesh.cli.restarts can start it again exactly so (the same
    # port, the same stage token); `env` is the part added to this process's environment.
    command: list[str] = field(default_factory=list)
    env: dict[str, str] | None = field(default=None, repr=False)
    started: float = field(default_factory=time.monotonic)


@dataclass
class Cluster:
    """A set of running fluxmesh processes; a context manager that stops them on exit."""

    children: list[Child] = field(default_factory=list)
    health_credentials: grpc.ChannelCredentials | None = None  # for processes that serve TLS
    output: IO[str] | None = None  # where the children's stdout and stderr go (None: this process's)
    on_serving: Callable[[Child], None] | None = None  # told as each child starts SERVING
    stage_token: str | None = field(default=None, repr=False)  # what the stages demand (start_local)

    @property
    def address(self) -> str:
        return self.children[-1].address  # the orchestrator is started last

    def start(
        self,
        name: str,
        args: list[str],
        address: str,
        env: dict[str, str] | None = None,
        *,
        probe_tcp_only: bool = False,
    ) -> Child:
        command = [sys.executable, "-m", "fluxmesh.cli", *args]
        log.debug("starting %s: %s", name, " ".join(command))
        child = Child(name, address, self._spawn(command, env), probe_tcp_only, command, env)
        self.children.append(child)
        return child

    def restart(self, child: Child) -> None:
        """Start a child that exited again, with the command and environment it first had."""
        child.process = self._spawn(child.command, child.env)
        child.started = time.monotonic()

    def _spawn(self, command: list[str], env: dict[str, str] | None) -> subprocess.Popen:
        return subprocess.Popen(
            command,
            env=child_environment(env),  # no preexec_fn: see lifeline.py
            stdout=self.output,
            stderr=subprocess.STDOUT if self.output else None,
        )

    def wait_serving(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        for child in self.children:
            while not self._is_up(child):
                if child.process.poll() is not None:
                    raise StartFailed(f"{child.name} exited with code {child.process.returncode} before serving")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{child.name} at {child.address} not SERVING after {timeout:.0f}s")
                time.sleep(0.1)
            log.info("%s SERVING on %s", child.name, child.address)
            if self.on_serving is not None:
                self.on_serving(child)

    def _is_up(self, child: Child) -> bool:
        if child.probe_tcp_only:
            host, _, port = child.address.rpartition(":")
            try:
                socket.create_connection((host.strip("[]"), int(port)), timeout=1.0).close()
                return True
            except OSError:
                return False
        status = health_status(child.address, credentials=self.health_credentials)
        return status == health_pb2.HealthCheckResponse.SERVING

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM everyone (orchestrator first), then SIGKILL what is still alive after `grace`."""
        for child in reversed(self.children):
            if child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in self.children:
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_local(
    model: str,
    *,
    port: int,
    host: str = "127.0.0.1",
    stage_args: dict[str, list[str]] | None = None,
    common_args: list[str] | None = None,
    orchestrator_args: list[str] | None = None,
    orchestrator_tls: bool = False,
    timeout: float = 300.0,
    share_cores: bool = True,
    output: IO[str] | None = None,
    on_serving: Callable[[Child], None] | None = None,
) -> Cluster:
    """Start encoder, denoiser, vae and the orchestrator; returns once all are SERVING.

    Only the orchestrator listens on `host`: the stages are this machine's children, reached by
    the orchestrator alone, so they listen on loopback and are never exposed unauthenticated.
    `share_cores`: each stage gets its share of this host's cores as its torch threads
    (fluxmesh.rpc.cores) unless the args give --threads; False leaves torch's default (all).
    `output` takes the children's logs (default: this process's stderr); `on_serving` hears of
    each child as it starts serving.
    """
    cluster = Cluster(output=output, on_serving=on_serving, stage_token=secrets.token_urlsafe(32))
    shares = cpu_shares(host_cores())
    try:
        addresses = {}
        for stage in STAGES:
            stage_port = free_port(LOOPBACK, besides={port})  # `port` is the orchestrator's, not bound yet
            addresses[stage] = f"{LOOPBACK}:{stage_port}"
            args = [
                "serve",
                stage,
                "--model",
                model,
                "--host",
                LOOPBACK,
                "--port",
                str(stage_port),
                "--token-env",
                STAGE_TOKEN_ENV,
            ]
            env = {STAGE_TOKEN_ENV: cluster.stage_token}
            if share_cores:
                env[CPU_SHARE_ENV] = str(shares[stage])
            cluster.start(stage, args + (common_args or []) + (stage_args or {}).get(stage, []), addresses[stage], env)
        cluster.start(
            "orchestrator",
            [
                "serve",
                "orchestrator",
                "--host",
                host,
                "--port",
                str(port),
                *[f"--{stage}={addresses[stage]}" for stage in STAGES],
                "--stage-token-env",
                STAGE_TOKEN_ENV,
                *(orchestrator_args or []),
            ],
            f"{reachable(host)}:{port}",
            {STAGE_TOKEN_ENV: cluster.stage_token},
            probe_tcp_only=orchestrator_tls,
        )
        cluster.wait_serving(timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster
