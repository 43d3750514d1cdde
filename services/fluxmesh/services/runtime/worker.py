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
import inspect
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")
_DONE = object()


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
        self._executor = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}-model") if own_thread else compute_executor()
        )
        # Checked on the model thread right before each model call (the stage's Residency sets
        # "weights are on the device"): checked there, a release queued ahead cannot slip between.
        self.precondition: Callable[[], None] | None = None

    async def run(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        return await self.run_unchecked(self._checked, fn, *args, **kwargs)

    def _checked(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        if self.precondition is not None:
            self.precondition()
        return fn(*args, **kwargs)

    def stream(self, fn: Callable[..., R | Awaitable[R]], /, *args, convert: Callable[..., T]) -> StreamingCall[T, R]:
        """A model call that reports while it runs: `fn(*args, emit, cancelled)` on the model
        thread (or, for a coroutine function such as the denoiser's batcher, awaited: it puts
        the work on this thread itself), where `emit(*item)` hands `convert(*item)` (made on the
        model thread, off the event loop) to the caller as it happens, and `cancelled` (a
        threading.Event) is set once the caller is gone, for `fn` to stop at its next check.
        See `StreamingCall`."""
        return StreamingCall(self, fn, args, convert)

    async def run_unchecked(self, fn: Callable[..., T], /, *args, **kwargs) -> T:
        """On the model thread without the precondition: for residency transitions themselves."""
        loop = asyncio.get_running_loop()
        # In a copy of the caller's context, so the model thread's log lines carry the request id.
        context = contextvars.copy_context()
        return await loop.run_in_executor(self._executor, functools.partial(context.run, _no_grad, fn, *args, **kwargs))

    def shutdown(self) -> None:
        if self._own:
            self._executor.shutdown(wait=True, cancel_futures=True)


class StreamingCall(Generic[T, R]):
    """The thread <-> event loop bridge of a streaming model call:

        async with worker.stream(engine.denoise, job, convert=step_event) as steps:
            async for event in steps:      # each as the model thread emits it
                yield event
            latents = steps.result         # what fn returned

    Leaving the block early (an error, the caller cancelled or went away) sets `cancelled` and
    waits for the model call to stop, so the stage is free again when the block is left."""

    def __init__(
        self, worker: ModelWorker, fn: Callable[..., R | Awaitable[R]], args: tuple[Any, ...], convert: Callable[..., T]
    ):
        self._worker, self._fn, self._args, self._convert = worker, fn, args, convert
        self.cancelled = threading.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Future | None = None
        self.result: R | None = None

    async def __aenter__(self) -> StreamingCall[T, R]:
        loop = asyncio.get_running_loop()

        def emit(*item: Any) -> None:  # on the model thread
            loop.call_soon_threadsafe(self._queue.put_nowait, self._convert(*item))

        if inspect.iscoroutinefunction(self._fn):
            call = self._fn(*self._args, emit, self.cancelled)
        else:
            call = self._worker.run(self._fn, *self._args, emit, self.cancelled)
        self._task = asyncio.ensure_future(call)
        self._task.add_done_callback(lambda _: loop.call_soon_threadsafe(self._queue.put_nowait, _DONE))
        return self

    async def __aiter__(self) -> AsyncIterator[T]:
        while (item := await self._queue.get()) is not _DONE:
            yield item
        self.result = self._task.result()  # the model call's error, if it failed

    async def __aexit__(self, *exc_info: Any) -> None:
        self.cancelled.set()  # reached on success, on error and when the caller goes away
        task = self._task
        if not task.done():
            await asyncio.shield(asyncio.wait([task]))
        if not task.cancelled():
            task.exception()  # retrieved: the Cancelled a caller's departure causes is expected


def _no_grad(fn: Callable[..., T], *args, **kwargs) -> T:
    with torch.inference_mode():
        return fn(*args, **kwargs)
