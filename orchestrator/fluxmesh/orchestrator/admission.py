"""A bounded FIFO in front of the stages.

Requests past `max_active` wait in order and are told their position whenever it changes; a
full queue is refused at once with RESOURCE_EXHAUSTED rather than letting latency grow without
bound.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fluxmesh.rpc.errors import ResourceExhausted


class Ticket:
    __slots__ = ("admitted",)

    def __init__(self) -> None:
        self.admitted = False


class AdmissionQueue:
    def __init__(self, *, max_active: int = 2, max_waiting: int = 32):
        self.max_active = max_active
        self.max_waiting = max_waiting
        self._waiting: list[Ticket] = []
        self._active = 0
        self._changed = asyncio.Condition()

    @property
    def depth(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return self._active

    def enter(self) -> Ticket:
        """Take a place in line, or raise ResourceExhausted when the line is full."""
        if len(self._waiting) >= self.max_waiting:
            raise ResourceExhausted(f"queue full: {len(self._waiting)} requests waiting (limit {self.max_waiting})")
        ticket = Ticket()
        self._waiting.append(ticket)
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
