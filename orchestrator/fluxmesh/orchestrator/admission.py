"""A bounded priority queue in front of the stages.

Requests past `max_active` wait: higher `priority` first, first come first served within a
priority. Each waiting request is told its position whenever it changes (a later arrival with a
higher priority moves it back). A full queue is refused at once with RESOURCE_EXHAUSTED rather
than letting latency grow without bound; a request abandoned in line gives its place back.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator

from fluxmesh.rpc.errors import ResourceExhausted


class Ticket:
    __slots__ = ("admitted", "priority", "order")

    def __init__(self, priority: int, order: int) -> None:
        self.admitted = False
        self.priority = priority
        self.order = order

    @property
    def rank(self) -> tuple[int, int]:
        return (-self.priority, self.order)


class AdmissionQueue:
    def __init__(self, *, max_active: int = 2, max_waiting: int = 32):
        self.max_active = max_active
        self.max_waiting = max_waiting
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

    async def wait_turn(self, ticket: Ticket) -> AsyncIterator[int]:
        """Yield the ticket's position (0 = next) each time it changes, until admitted."""
        last = None
        while True:
            async with self._changed:
                position = self._waiting.index(ticket)
                if position == 0 and self._active < self.max_active:
                    self._waiting.pop(0)
                    self._active += 1
                    ticket.admitted = True
                    self._changed.notify_all()
                    return
                if position == last:
                    await self._changed.wait()
                    continue
            # Yield outside the lock: the caller sends an event to its client meanwhile.
            last = position
            yield position

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
