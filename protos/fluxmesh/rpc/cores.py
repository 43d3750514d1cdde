"""The torch threads each stage process that `fluxmesh up` starts gets on a CPU host.

The denoiser computes for most of a request (every step runs the transformer) and, with
requests queued, all of the time: it gets every core. The encoder and the VAE compute once per
request, briefly, overlapping the denoiser's steps: a quarter of the cores each, at least one.
On 2 cores that is 1/2/1, and the 1-thread stages start no OpenMP team at all.

Why not divide the cores so the stages never overlap: since all torch work of a stage runs on
one thread (fluxmesh.services.worker), idle stages no longer hold spinning thread teams, and on a
quiet 2-core host dividing (1/1/1) cost 26-39 % of the images/s against this rule, serial and 8 at
once alike, while concurrency cost nothing with either (docs/benchmarks.md, "cores").

The share travels to the child in its environment (CPU_SHARE_ENV) rather than as --threads: it
is only up's default, so an explicit --threads still wins, and a stage on an accelerator keeps
its CPU threads few whatever its share (fluxmesh.services.runtime.device.stage_threads).
"""

from __future__ import annotations

import os

from fluxmesh.contract import Stage

CPU_SHARE_ENV = "FLUXMESH_CPU_SHARE"

BRIEF_STAGE_FRACTION = 4  # the encoder's and the VAE's share: 1/4 of the cores each


def host_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cpu_shares(cores: int) -> dict[Stage, int]:
    """Each stage's torch threads on a host with `cores`: 2 -> 1/2/1, 4 -> 1/4/1, 16 -> 4/16/4."""
    brief = max(1, cores // BRIEF_STAGE_FRACTION)
    return {Stage.encoder: brief, Stage.denoiser: max(1, cores), Stage.vae: brief}


def parse_share(value: str | None) -> int | None:
    """CPU_SHARE_ENV's value as a thread count (None when unset or not a positive integer)."""
    return int(value) if value and value.isdigit() and int(value) > 0 else None
