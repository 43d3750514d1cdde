"""Ports: the ones fluxmesh picks for its children never race the kernel's, and a port that is
taken stops a server at start-up with one line naming it, instead of a traceback or, worse, a
second server silently sharing the port through SO_REUSEPORT."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fluxmesh.cli import ports
from fluxmesh.cli.ports import _ephemeral_start, free_port
from fluxmesh.cli.supervisor import Cluster, start_local

FLUXMESH = [sys.executable, "-m", "fluxmesh.cli"]


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range():
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(port < _ephemeral_start() for port in ports)
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", port))


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)  # as a gRPC server binds: the hard case
        sock.bind(("127.0.0.1", free_port()))
        sock.listen()
        yield sock.getsockname()[1]


def _orchestrator(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FLUXMESH, "serve", "orchestrator", "--host", "127.0.0.1", *flags], capture_output=True, text=True, timeout=60
    )


def test_a_taken_grpc_port_stops_the_server_with_a_message(taken_port):
    result = _orchestrator("--port", str(taken_port))
    assert result.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken_port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_taken_metrics_port_stops_the_server_with_a_message(taken_port):
    result = _orchestrator("--port", str(free_port()), "--metrics-port", str(taken_port))
    assert result.returncode == 1
    assert f"cannot serve metrics on port {taken_port}" in result.stderr
    assert "Traceback" not in result.stderr


class _Draws:
    """Stands in for the ports module's random source: hands out `ports` in order."""

    def __init__(self, ports: list[int]):
        self.ports = iter(ports)

    def randrange(self, low: int, high: int) -> int:
        return next(self.ports)


def test_a_port_promised_to_someone_else_is_never_drawn(monkeypatch):
    promised, other = free_port(), free_port()  # bindable now
    monkeypatch.setattr(ports, "_handed_out", set())  # and, as far as free_port knows, never handed out
    monkeypatch.setattr(ports, "_random", _Draws([promised, other]))
    assert free_port(besides={promised}) == other


def test_up_never_gives_a_stage_the_orchestrators_port(monkeypatch):
    """`fluxmesh up --port P` draws its stages' ports while P is still unbound: a stage that drew
    P died with "address already in use" when the orchestrator had bound it first (seen once in
    a CI rehearsal of test_security's secure `up`)."""
    orchestrator, *stages = (free_port() for _ in range(4))
    monkeypatch.setattr(ports, "_handed_out", set())
    # Every stage's draw is offered the orchestrator's port first.
    monkeypatch.setattr(ports, "_random", _Draws([p for stage in stages for p in (orchestrator, stage)]))
    started: dict[str, str] = {}
    monkeypatch.setattr(
        Cluster, "start", lambda self, name, args, address, env=None, **_: started.setdefault(name, address)
    )
    monkeypatch.setattr(Cluster, "wait_serving", lambda self, timeout=300.0: None)
    start_local("unused-model-folder", port=orchestrator)
    assert started == {
        "encoder": f"127.0.0.1:{stages[0]}",
        "denoiser": f"127.0.0.1:{stages[1]}",
        "vae": f"127.0.0.1:{stages[2]}",
        "orchestrator": f"127.0.0.1:{orchestrator}",
    }
