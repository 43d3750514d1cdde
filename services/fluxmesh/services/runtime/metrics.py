"""Prometheus metrics of a stage process: weights and device memory held, denoising speed.

Process RSS comes with prometheus_client's process collector; RPC counts and latencies with
`fluxmesh.rpc.metrics`. Gauges here are read at scrape time, so they follow weights being
loaded, offloaded or released without anyone having to remember to update them.
"""

from __future__ import annotations

import torch
from prometheus_client import Counter, Gauge, Histogram

WEIGHT_BYTES = Gauge("fluxmesh_stage_weight_bytes", "Bytes of model weights this stage holds", ["stage"])
DEVICE_ALLOCATED = Gauge("fluxmesh_device_memory_allocated_bytes", "Accelerator memory allocated by torch", ["device"])
DEVICE_PEAK = Gauge("fluxmesh_device_memory_peak_bytes", "Peak accelerator memory allocated by torch", ["device"])
STEPS = Counter("fluxmesh_denoiser_steps", "Denoising steps computed")
STEP_SECONDS = Histogram(
    "fluxmesh_denoiser_step_seconds",
    "Time per denoising step",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
STEPS_PER_SECOND = Gauge("fluxmesh_denoiser_steps_per_second", "Speed of the most recent denoising step")


def watch_stage(stage: str, engine) -> None:
    """Export what `engine` (any stage engine: `weight_bytes()`, `device`) holds."""
    WEIGHT_BYTES.labels(stage).set_function(engine.weight_bytes)
    device = engine.device.torch_device
    if device.type == "cuda":
        DEVICE_ALLOCATED.labels(str(device)).set_function(lambda: torch.cuda.memory_allocated(device))
        DEVICE_PEAK.labels(str(device)).set_function(lambda: torch.cuda.max_memory_allocated(device))


def record_step(seconds: float) -> None:
    STEPS.inc()
    STEP_SECONDS.observe(seconds)
    if seconds > 0:
        STEPS_PER_SECOND.set(1.0 / seconds)
