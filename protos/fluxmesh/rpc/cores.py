"""How a CPU host's cores are divided between the stage processes `fluxmesh up` starts.

Each stage process runs its own torch (OpenMP) thread team, and idle teams spin. With every
stage on torch's default (all cores), a request encoding while another denoises oversubscribes
the host: measured on 2 cores, 8 requests sent at once finished at 0.71x the images/s of the same
8 sent one after another (docs/benchmarks.md, "Concurrency and CPU threads"). Dividing the cores
makes concurrency never cost throughput; the price is that a lone request's stages no longer
each have every core.

The share travels to the child in its environment (CPU_SHARE_ENV) rather than as --threads: it
is only up's default, so an explicit --threads still wins, and a stage on an accelerator keeps
its CPU threads few whatever its share (fluxmesh.services.runtime.device.stage_threads).
"""

from __future__ import annotations

import os

CPU_SHARE_ENV = "FLUXMESH_CPU_SHARE"

# The denoiser does most of the compute of a request (every step runs the transformer); the
# encoder and the VAE run once per request each.
STAGE_WEIGHTS = {"encoder": 1, "denoiser": 2, "vae": 1}


def host_cores() -> int:
    """Cores this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def divide_cores(cores: int, weights: dict[str, int] = STAGE_WEIGHTS) -> dict[str, int]:
    """Each stage's torch threads: cores in proportion to `weights`, at least one each; what
    rounding leaves goes to the heaviest stage. 2 cores -> 1/1/1, 4 -> 1/2/1, 16 -> 4/8/4."""
    total = sum(weights.values())
    shares = {stage: max(1, cores * weight // total) for stage, weight in weights.items()}
    heaviest = max(weights, key=weights.__getitem__)
    shares[heaviest] += max(0, cores - sum(shares.values()))
    return shares


def parse_share(value: str | None) -> int | None:
    """CPU_SHARE_ENV's value as a thread count (None when unset or not a positive integer)."""
    return int(value) if value and value.isdigit() and int(value) > 0 else None
