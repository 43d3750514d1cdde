"""A bounded priority queue in front of the stages.

Requests past `max_active` wait: higher `priority` first, first come first served within a
priority. Each waiting request is told its position whenever it changes (a later arrival with a
higher priority moves it back). A full queue is refused at once with RESOURCE_EXHAUSTED rather
than letting latency grow without bound; a request abandoned in line gives its place back.

Priority never starves anyone: a waiting request may be overtaken (a request that came after it
admitted before it) at most `max_overtakes` times (default 8); then it goes next, the oldest
such first. So a request starts after at most (requests already waiting or running when it
came) + `max_overtakes` others: with the defaults (2 running, 32 waiting) after at most 42
admissions, whatever priorities keep arriving; each of those is bounded in time by the work
budget and --request-timeout.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator

import grpc

from fluxmesh.rpc.errors import FluxmeshError, ResourceExhausted

MAX_OVERTAKES = 8


class Ticket:
    __slots__ = ("admitted", "priority", "order", "overtaken")

    def __init__(self, priority: int, order: int) -> None:
        self.admitted = False
        self.priority = priority
        self.order = order
        self.overtaken = 0  # later arrivals admitted before this one

    @property
    def rank(self) -> tuple[int, int]:
        return (-self.priority, self.order)


class AdmissionQueue:
    def __init__(self, *, max_active: int = 2, max_waiting: int = 32, max_overtakes: int = MAX_OVERTAKES):
        self.max_active = max_active
        self.max_waiting = max_waiting
        self.max_overtakes = max_overtakes
        self._waiting: list[Ticket] = []  # kept sorted by rank: the head runs next
        self._active = 0
        self._arrivals = itertools.count()
        self._changed = asyncio.Condition()
        self._wakeups: set[asyncio.Task] = set()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._active

    def enter(self, priority: int = 0) -> Ticket:
        """Take a place in line, or raise ResourceExhausted when the line is full."""
        if len(self._waiting) >= self.max_waiting:
            raise ResourceExhausted(
                f"queue full: {len(self._waiting)} requests waiting (limit {self.max_waiting}); retry later"
            )
        ticket = Ticket(priority, next(self._arrivals))
        position = next((i for i, t in enumerate(self._waiting) if t.rank > ticket.rank), len(self._waiting))
        self._waiting.insert(position, ticket)
        if position < len(self._waiting) - 1:
            self._notify_soon()  # those behind it moved back a place
        return ticket

    async def wait_turn(self, ticket: Ticket, timeout: float | None = None) -> AsyncIterator[int]:
        """Yield the ticket's position (0 = next) each time it changes, until admitted. After
        `timeout` seconds in line (the request's deadline or the server's cap) DEADLINE_EXCEEDED;
        the caller's `leave` then gives the place back."""
        last = None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            async with self._changed:
                is_next = ticket is self._next()
                # Positions count by rank; one a starved request went ahead of is at least 1.
                position = 0 if is_next else max(1, self._waiting.index(ticket))
                if is_next and self._active < self.max_active:
                    self._waiting.remove(ticket)
                    for waiting in self._waiting:
                        if waiting.order < ticket.order:
                            waiting.overtaken += 1
                    self._active += 1
                    ticket.admitted = True
                    self._changed.notify_all()
                    return
                if position == last:
                    left = None if deadline is None else deadline - time.monotonic()
                    try:
                        await asyncio.wait_for(self._changed.wait(), left)
                    except TimeoutError:
                        raise FluxmeshError(
                            f"no turn within {timeout:g} s (the request's deadline or the "
                            "server's --request-timeout); retry later",
                            code=grpc.StatusCode.DEADLINE_EXCEEDED,
                        ) from None
                    continue
            # Yield outside the lock: the caller sends an event to its client meanwhile.
            last = position
            yield position

    def _next(self) -> Ticket:
        """Who goes next: the oldest request overtaken `max_overtakes` times, else the best rank."""
        starved = [t for t in self._waiting if t.overtaken >= self.max_overtakes]
        return min(starved, key=lambda t: t.order) if starved else self._waiting[0]

    async def leave(self, ticket: Ticket) -> None:
        """Give the place back: after the request ran, or when it was abandoned in line."""
        async with self._changed:
            if ticket.admitted:
                self._active -= 1
                ticket.admitted = False
            elif ticket in self._waiting:
                self._waiting.remove(ticket)
            self._changed.notify_all()

    def _notify_soon(self) -> None:
        async def notify() -> None:
            async with self._changed:
                self._changed.notify_all()

        task = asyncio.get_running_loop().create_task(notify())
        self._wakeups.add(task)  # held until done: the loop keeps only weak references to tasks
        task.add_done_callback(self._wakeups.discard)
