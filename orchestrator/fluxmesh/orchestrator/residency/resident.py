"""Where the stages' weights live while requests run.

Every stage call in the Generator goes through `residency.use(stage)`. With all stages
resident (one GPU each, or enough memory) that is a no-op; `SequentialStrategy`
(sequential.py: one accelerator taking turns) decides there when a stage's weights are loaded
and released.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

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


class ResidencyStrategy(Protocol):
    """What the Generator asks of a strategy."""

    # Every stage keeps its weights while the others run: the vae can decode previews while the
    # denoiser steps (not so in sequential mode).
    stages_stay_loaded: bool

    def use(self, stage: str, cost: SwapCost | None = None) -> AbstractAsyncContextManager[None]:
        """Hold `stage` loaded for one call."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ResidentStrategy:
    """Every stage keeps its weights on its device: nothing to do."""

    stages_stay_loaded = True

    @asynccontextmanager
    async def use(self, stage: str, cost: SwapCost | None = None) -> AsyncIterator[None]:
        yield

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
