"""Where the stages' weights live while requests run.

Every stage call in the Generator goes through `residency.use(stage)`. With all stages
resident (one GPU each, or enough memory) that is a no-op; `SequentialStrategy`
(sequential.py: one accelerator taking turns) decides there when a stage's weights are loaded
and released.
"""

from __future__ import annotations

import itertools
from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

_arrivals = itertools.count()


def next_order() -> int:
    """A number larger than every request's `SwapCost.order` so far."""
    return next(_arrivals)


@dataclass
class SwapCost:
    """What a request waited on weight swaps for (reported in Timings). One per request, made
    when it is admitted: `order` tells older requests from newer ones (sequential mode lets the
    oldest waiting request choose the next stage to load)."""

    swaps: int = 0
    seconds: float = 0.0
    order: int = field(default_factory=next_order)


class ResidentStrategy:
    """Every stage keeps its weights on its device: nothing to do."""

    @asynccontextmanager
    async def use(self, stage: str, cost: SwapCost | None = None) -> AsyncIterator[None]:
        yield

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
