"""What a stage holds in memory: weight bytes, RSS now, peak."""

from __future__ import annotations

import resource
import sys

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


def current_rss_bytes() -> int:
    """The process's resident set size now (what `ps` shows), unlike the peak below."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on a GPU; the process's peak RSS otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
