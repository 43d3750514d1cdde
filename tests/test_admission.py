"""Back-pressure: a bounded queue, higher priority first, FIFO within a priority, a full queue
refused at once while what was accepted still completes.

The queue itself is tested in-process; the end-to-end test runs an extra orchestrator (one slot,
two places in line) in front of the shared session stages. Runtime: about 10 s.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from factories import PROMPT
from fluxmesh.client import Client, FluxmeshError, Queued, Result, Step
from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.rpc.errors import ResourceExhausted
from mesh import Mesh


async def _admit_all(queue: AdmissionQueue, tickets, order: list[str]) -> None:
    async def run(name, ticket):
        async for _ in queue.wait_turn(ticket):
            pass
        order.append(name)
        await queue.leave(ticket)

    await asyncio.gather(*(run(name, ticket) for name, ticket in tickets))


async def test_higher_priority_first_fifo_within_a_priority():
    queue = AdmissionQueue(max_active=1, max_waiting=8)
    holder = queue.enter()
    async for _ in queue.wait_turn(holder):
        pass  # takes the only slot
    tickets = [
        (name, queue.enter(priority))
        for name, priority in [("low-1", 0), ("high-1", 5), ("low-2", 0), ("mid", 1), ("high-2", 5), ("neg", -3)]
    ]
    order: list[str] = []
    admitting = asyncio.ensure_future(_admit_all(queue, tickets, order))
    await asyncio.sleep(0.05)
    assert order == []  # the slot is still taken
    await queue.leave(holder)
    await asyncio.wait_for(admitting, 5)
    assert order == ["high-1", "high-2", "mid", "low-1", "low-2", "neg"]


async def test_positions_move_back_when_a_higher_priority_arrives():
    queue = AdmissionQueue(max_active=1, max_waiting=4)
    holder = queue.enter()
    async for _ in queue.wait_turn(holder):
        pass
    low = queue.enter(0)
    positions: list[int] = []

    async def follow():
        async for position in queue.wait_turn(low):
            positions.append(position)

    following = asyncio.ensure_future(follow())
    await asyncio.sleep(0.02)
    high = queue.enter(9)
    await asyncio.sleep(0.02)
    assert positions == [0, 1]
    await queue.leave(holder)
    async for _ in queue.wait_turn(high):
        pass
    await asyncio.sleep(0.02)
    assert positions == [0, 1, 0]  # next in line again, behind the one that overtook it
    await queue.leave(high)
    await asyncio.wait_for(following, 5)


async def test_a_full_queue_refuses_at_once_and_an_abandoned_place_is_given_back():
    queue = AdmissionQueue(max_active=1, max_waiting=2)
    _first, second = queue.enter(), queue.enter(100)
    with pytest.raises(ResourceExhausted, match="queue full: 2 requests waiting"):
        queue.enter(1000)  # priority does not buy a place in a full line
    await queue.leave(second)  # its client went away while waiting
    assert queue.depth == 1
    queue.enter()


@pytest.fixture(scope="module")
def small_orchestrator(stage_addresses, stage_token):
    """One request at a time, two places in line, in front of the shared stages."""
    only_one = {"orchestrator": ["--max-active", "1", "--max-queue", "2"]}
    with Mesh(stages=stage_addresses, stage_token=stage_token, extra_args=only_one).start_all(timeout=60) as cluster:
        yield cluster.address


def test_a_full_queue_is_refused_at_once_while_accepted_requests_complete(small_orchestrator):
    outcomes: dict[str, object] = {}
    queued: dict[str, threading.Event] = {"low": threading.Event(), "high": threading.Event()}
    finished: list[str] = []
    running = threading.Event()

    def generate(name: str, priority: int, steps: int, side: int = 64) -> None:
        with Client(small_orchestrator, timeout=120) as client:
            try:
                for event in client.stream(PROMPT, width=side, height=side, steps=steps, seed=1, priority=priority):
                    if isinstance(event, Queued) and name in queued:
                        queued[name].set()
                    if isinstance(event, Step) and name == "running":
                        running.set()
                    if isinstance(event, Result):
                        outcomes[name] = event
                        finished.append(name)
            except FluxmeshError as error:
                outcomes[name] = error

    threads = [threading.Thread(target=generate, args=("running", 0, 60, 512))]  # ~3 s in the only slot
    threads[0].start()
    assert running.wait(30)
    for name, priority in (("low", 0), ("high", 5)):
        threads.append(threading.Thread(target=generate, args=(name, priority, 2)))
        threads[-1].start()
        assert queued[name].wait(30)
    with Client(small_orchestrator, timeout=30) as client:
        started = time.monotonic()
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=64, height=64, steps=1, seed=1)
        refused_in = time.monotonic() - started
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "queue full" in caught.value.message
    assert refused_in < 2.0  # at once (connection included, on a busy machine), not after the line drained
    for thread in threads:
        thread.join(120)
    assert all(isinstance(outcomes[name], Result) for name in ("running", "low", "high")), outcomes
    assert finished == ["running", "high", "low"]  # the later, higher-priority request went first


async def test_a_low_priority_request_is_overtaken_at_most_max_overtakes_times():
    """Priority starvation: behind a line of higher priorities (as long as clients keep sending
    them), a priority-0 request still starts after at most (those already in line when it came)
    + max_overtakes admissions. Before, it waited for every one of them."""
    queue = AdmissionQueue(max_active=1, max_waiting=32, max_overtakes=3)
    holder = queue.enter()
    async for _ in queue.wait_turn(holder):
        pass
    tickets = [(f"older-{i}", queue.enter(0)) for i in range(2)]  # already waiting when the low one comes
    tickets.append(("low", queue.enter(-5)))
    tickets += [(f"high-{i}", queue.enter(10)) for i in range(20)]
    admitted: list[str] = []
    admitting = asyncio.ensure_future(_admit_all(queue, tickets, admitted))
    await queue.leave(holder)
    await asyncio.wait_for(admitting, 5)
    before_low = admitted[: admitted.index("low")]
    assert len(before_low) <= 2 + 3, admitted  # the bound: the older ones + max_overtakes
    assert before_low[:3] == ["high-0", "high-1", "high-2"]  # priority still orders the rest
