"""Ports: the ones fluxmesh picks for its children never race the kernel's, and a port that is
taken stops a server at start-up with one line naming it, instead of a traceback or, worse, a
second server silently sharing the port through SO_REUSEPORT."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from fluxmesh.cli.ports import _ephemeral_start, free_port

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
