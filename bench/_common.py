"""Shared by the bench scripts: timing with medians, and a tiny model written once."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path


def timed(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Seconds per call, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


def median(samples: list[float]) -> float:
    return statistics.median(samples)


def tiny_model(folder: Path, size: str = "small", **kwargs) -> Path:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    if not (folder / "model_index.json").exists():
        write_tiny_model(folder, size=size, **kwargs)
    return folder
