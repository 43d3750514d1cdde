"""What a stage holds in memory: weight bytes, RSS now, peak."""

from __future__ import annotations

import resource
import sys
from pathlib import Path
from typing import NamedTuple

import torch


def module_bytes(*modules: torch.nn.Module | None) -> int:
    """Bytes held by parameters and buffers (quantized GGUF parameters count as stored)."""
    total = 0
    for module in modules:
        if module is None:
            continue
        for tensor in [*module.parameters(), *module.buffers()]:
            total += tensor.numel() * tensor.element_size()
    return total


class ProcessMemory(NamedTuple):
    rss: int  # resident now (what `ps` shows)
    peak: int  # the most it has been resident since it started (or since a reset_peak)


_STATUS = Path("/proc/self/status")


def process_memory(*, reset_peak: bool = False) -> ProcessMemory:
    """This process's resident memory now and at its peak; `reset_peak` starts a new peak from now.

    On Linux both come from /proc/self/status (VmRSS, VmHWM): VmHWM belongs to this process's own
    address space. getrusage's ru_maxrss does not: Linux carries the parent's peak into a child
    across fork + exec, so every stage started by a big parent (a benchmark that had just written
    the weights) reported the parent's 14 GiB as its own peak. A reset writes 5 to
    /proc/self/clear_refs (Linux >= 4.0), which sets VmHWM to the RSS of that moment.
    """
    if reset_peak and _STATUS.exists():
        Path("/proc/self/clear_refs").write_text("5")
    if _STATUS.exists():
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if line.startswith("Vm"))
        rss, peak = (int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM"))
        return ProcessMemory(rss, peak)
    import psutil

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere, the best there is
    rss = int(psutil.Process().memory_info().rss)
    return ProcessMemory(rss, max(rss, peak if sys.platform == "darwin" else peak * 1024))


def current_rss_bytes() -> int:
    """The process's resident set size now (what `ps` shows), unlike the peak below."""
    return process_memory().rss


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU; this process's own peak RSS otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return process_memory().peak
