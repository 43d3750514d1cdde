"""Run model compute off the event loop, one call at a time per stage, on one thread.

A stage owns one device; running two forward passes on it at once only makes both slower and
doubles activation memory, so each stage serialises its model calls through one thread. The
event loop stays free for health checks, Info and streaming.

That thread is also the only one in the process that touches torch: loading included
(`compute_executor()`). Every thread that runs CPU kernels gets its own OpenMP team, and idle
teams spin; with the weights loaded on the main thread and the loop run on a worker, the two
teams fought over the cores and denoising on 2 cores took 0.76 s instead of 0.55 s
(bench/latency.py).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


_COMPUTE: ThreadPoolExecutor | None = None


def compute_executor() -> ThreadPoolExecutor:
    """The process's one torch thread (created on first use)."""
    global _COMPUTE
    if _COMPUTE is None:
        _COMPUTE = ThreadPoolExecutor(max_workers=1, thread_name_prefix="torch-compute")
    return _COMPUTE


class ModelWorker:
    def __init__(self, name: str, *, own_thread: bool = False):
        """`own_thread=True` for a lane that must not queue behind the main one (VAE previews)."""
        self._own = own_thread
        self._executor = (ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
                          if own_thread else compute_executor())
        # Checked on the model thread right before each model call (the stage's Residency sets
        # "weights are on the device"): checked there, a release queued ahead cannot slip between.
        self.precondition: Callable[[], None] | None = None

    async def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        return await self.run_unchecked(self._checked, fn, *args, **kwargs)

    def _checked(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        if self.precondition is not None:
            self.precondition()
        return fn(*args, **kwargs)

    async def run_unchecked(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """On the model thread without the precondition: for residency transitions themselves."""
        loop = asyncio.get_running_loop()
        # In a copy of the caller's context, so the model thread's log lines carry the request id.
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, functools.partial(context.run, _no_grad, fn, *args, **kwargs))

    def shutdown(self) -> None:
        if self._own:
            self._executor.shutdown(wait=True, cancel_futures=True)


def _no_grad(fn: Callable[..., T], *args, **kwargs) -> T:
    with torch.inference_mode():
        return fn(*args, **kwargs)
