"""Run model compute off the event loop, one call at a time per stage.

A stage owns one device; running two forward passes on it at once only makes both slower and
doubles activation memory, so each stage serialises its model calls through one thread. The
event loop stays free for health checks, Info and streaming.
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


class ModelWorker:
    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")
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
        self._executor.shutdown(wait=True, cancel_futures=True)


def _no_grad(fn: Callable[..., T], *args, **kwargs) -> T:
    with torch.inference_mode():
        return fn(*args, **kwargs)
