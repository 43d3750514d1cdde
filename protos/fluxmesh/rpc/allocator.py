"""glibc's allocator, set up for a process that moves multi-MiB tensors through gRPC.

Every hop of a T5 embedding (4 MiB in bf16, 8 MiB in fp32) allocates a handful of buffers that
size: the protobuf bytes, gRPC's slices, the received message. With glibc's defaults a block
over the (dynamic) mmap threshold is a fresh `mmap` each time and a `munmap` when freed, so every
buffer is faulted in page by page again: measured, that more than doubled the time of a hop
(bench/transfer.py). Raising the mmap threshold to 32 MiB (glibc's maximum) and the trim
threshold to 128 MiB keeps such blocks on the heap, where freed ones are reused already mapped.

Memory that must really leave the process (a stage releasing its weights in sequential mode)
is handed back explicitly with `trim_heap()`, which ignores the trim threshold.
FLUXMESH_MALLOC_TUNING=0 leaves glibc's defaults, to measure what this is worth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameters, from glibc's malloc.h
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 2**20  # DEFAULT_MMAP_THRESHOLD_MAX on 64-bit glibc; higher is refused
TRIM_THRESHOLD_BYTES = 128 * 2**20


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def tune_for_tensor_traffic() -> bool:
    """Keep multi-MiB buffers on the heap (see the module doc). Returns whether it took effect."""
    libc = _glibc()
    if libc is None or os.environ.get("FLUXMESH_MALLOC_TUNING", "1") == "0":
        return False
    applied = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
    if not applied:
        log.warning("mallopt refused the tensor-traffic settings; keeping glibc's defaults")
    return applied


def trim_heap() -> None:
    """Give freed heap memory back to the OS now (glibc only; elsewhere a no-op)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
