"""Prometheus metrics every fluxmesh process exports, and the HTTP endpoint that serves them.

Each process exports on its own `--metrics-port` (plain HTTP, `/metrics`):
* `fluxmesh_rpc_handled_total{service,method,code}`: calls by final status: errors by status code.
* `fluxmesh_rpc_seconds{service,method}`: call latency.
* `fluxmesh_rpc_in_flight{service,method}`: calls received and not yet finished (running or waiting
  for the model thread): at a stage, the load an autoscaler scales on (deploy/kubernetes).
* `process_resident_memory_bytes` and friends (prometheus_client's process collector): memory held.
The orchestrator adds queue and per-stage metrics (`fluxmesh.orchestrator.metrics`), the stages
add weights, device memory and denoising speed (`fluxmesh.services.runtime.metrics`).
"""

from __future__ import annotations

import logging

from prometheus_client import Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Latencies from a health check (sub-millisecond) to a 1024px FLUX.1-dev generation (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000)

RPC_HANDLED = Counter(
    "fluxmesh_rpc_handled", "RPCs completed, by final gRPC status code", ["service", "method", "code"]
)
RPC_SECONDS = Histogram(
    "fluxmesh_rpc_seconds", "RPC latency from receipt to final status", ["service", "method"], buckets=LATENCY_BUCKETS
)
RPC_IN_FLIGHT = Gauge("fluxmesh_rpc_in_flight", "RPCs received and not yet finished", ["service", "method"])

_serving: set[int] = set()


def serve_metrics(port: int | None, host: str = "") -> int | None:
    """Start the /metrics HTTP endpoint on `port` (0 picks a free port); None or a negative port: off.

    Returns the port it listens on. Idempotent per port within a process.
    """
    if port is None or port < 0:
        return None
    if port in _serving and port:
        return port
    host = host.strip("[]") or "0.0.0.0"
    server, _thread = start_http_server(port, addr=host)
    bound = server.server_address[1]
    _serving.add(bound)
    log.info("metrics on http://%s:%d/metrics", host, bound)
    return bound
