"""Prometheus metrics of the orchestrator: the queue, and where requests spend their time.

Errors by status code and request latency come from the RPC metrics every server exports
(`fluxmesh_rpc_handled_total{method="Generate",code=...}`, `fluxmesh_rpc_seconds`).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.rpc.metrics import LATENCY_BUCKETS
from fluxmesh.v1 import generator_pb2

QUEUE_DEPTH = Gauge("fluxmesh_queue_depth", "Requests waiting in the admission queue")
ACTIVE = Gauge("fluxmesh_active_requests", "Requests running through the stages")
QUEUE_LIMIT = Gauge("fluxmesh_queue_limit", "Requests that may wait before RESOURCE_EXHAUSTED")
STAGE_SECONDS = Histogram(
    "fluxmesh_stage_seconds",
    "Time per stage of a completed request, as the orchestrator saw it",
    ["stage"],
    buckets=LATENCY_BUCKETS,
)
QUEUED_SECONDS = Histogram("fluxmesh_queued_seconds", "Time a request waited for its turn", buckets=LATENCY_BUCKETS)
DENOISE_STEPS_PER_SECOND = Gauge(
    "fluxmesh_denoise_steps_per_second", "Denoising steps per second of the most recent request"
)

STAGE_SERVING = Gauge("fluxmesh_stage_serving", "1 while the stage can serve the orchestrator, else 0", ["stage"])
# What the orchestrator sees of a restart, whoever restarted the stage (fluxmesh up's supervisor,
# a container runtime): the stage was down and serves again. A network outage that heals counts too.
STAGE_RESTARTS = Counter(
    "fluxmesh_stage_restarts", "Times a stage served again after the orchestrator had seen it down", ["stage"]
)


def record_stage_health(stage: str, serving: bool, *, came_back: bool) -> None:
    STAGE_SERVING.labels(stage).set(1 if serving else 0)
    restarts = STAGE_RESTARTS.labels(stage)  # exported from the start, at 0
    if came_back:
        restarts.inc()


def watch_queue(queue: AdmissionQueue) -> None:
    QUEUE_DEPTH.set_function(lambda: queue.depth)
    ACTIVE.set_function(lambda: queue.active)
    QUEUE_LIMIT.set_function(lambda: queue.max_waiting)


def record_result(timings: generator_pb2.Timings, steps: int) -> None:
    QUEUED_SECONDS.observe(timings.queued_seconds)
    STAGE_SECONDS.labels("encode").observe(timings.encode_seconds)
    STAGE_SECONDS.labels("denoise").observe(timings.denoise_seconds)
    STAGE_SECONDS.labels("decode").observe(timings.decode_seconds)
    if timings.denoise_seconds > 0:
        DENOISE_STEPS_PER_SECOND.set(steps / timings.denoise_seconds)
