"""ModelWorker.stream: the thread <-> event loop bridge of a streaming model call."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from fluxmesh.services.runtime.worker import ModelWorker


def _count(n: int, emit, cancelled: threading.Event) -> str:
    for i in range(n):
        if cancelled.is_set():
            return f"stopped at {i}"
        emit(i, threading.current_thread().name)
        time.sleep(0.01)
    return "done"


async def test_items_arrive_in_order_converted_on_the_model_thread_then_the_result():
    worker = ModelWorker("test", own_thread=True)
    try:

        def convert(i, emitted_on):
            return i, emitted_on, threading.current_thread().name

        async with worker.stream(_count, 5, convert=convert) as call:
            items = [item async for item in call]
        assert [i for i, _, _ in items] == list(range(5))
        assert all(emitted == converted != threading.current_thread().name for _, emitted, converted in items)
        assert call.result == "done"
    finally:
        worker.shutdown()


async def test_leaving_early_stops_the_call_and_waits_for_it():
    worker = ModelWorker("test", own_thread=True)
    finished = []
    try:

        def run(emit, cancelled):
            finished.append(_count(1000, emit, cancelled))

        async with worker.stream(run, convert=lambda i, _: i) as call:
            async for i in call:
                if i == 2:
                    break
        assert call.cancelled.is_set()
        assert finished and finished[0].startswith("stopped at")  # stopped, and waited for, before the block ended
    finally:
        worker.shutdown()


async def test_the_model_calls_error_reaches_the_caller():
    worker = ModelWorker("test", own_thread=True)
    try:

        def fail(emit, cancelled):
            emit(1)
            raise ValueError("bad step")

        seen = []
        with pytest.raises(ValueError, match="bad step"):
            async with worker.stream(fail, convert=lambda i: i) as call:
                async for item in call:
                    seen.append(item)
        assert seen == [1]
    finally:
        worker.shutdown()


async def test_a_cancelled_caller_stops_the_call():
    worker = ModelWorker("test", own_thread=True)
    finished = []
    try:

        def run(emit, cancelled):
            finished.append(_count(1000, emit, cancelled))

        async def consume():
            async with worker.stream(run, convert=lambda i, _: i) as call:
                async for _ in call:
                    pass

        task = asyncio.ensure_future(consume())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert finished and finished[0].startswith("stopped at")
    finally:
        worker.shutdown()


async def test_a_coroutine_function_is_awaited_and_streams_the_same_way():
    """As the denoiser's batcher: it puts the work on the model thread itself."""
    worker = ModelWorker("test", own_thread=True)
    try:

        async def batched(n, emit, cancelled):
            return await worker.run_unchecked(_count, n, emit, cancelled)

        async with worker.stream(batched, 3, convert=lambda i, _: i) as call:
            items = [item async for item in call]
        assert items == [0, 1, 2] and call.result == "done"
    finally:
        worker.shutdown()
