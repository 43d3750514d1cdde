"""Run model compute off the event loop, one call at a time per stage.

A stage owns one device; running two forward passes on it at once only makes both slower and
doubles activation memory, so each stage serialises its model calls through one thread. The
event loop stays free for health checks, Info and streaming.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


class ModelWorker:
    def __init__(self, name: str):
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model")

    async def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(_no_grad, fn, *args, **kwargs))

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)


def _no_grad(fn: Callable[..., T], *args, **kwargs) -> T:
    with torch.inference_mode():
        return fn(*args, **kwargs)
