"""Where the stages' weights live while requests run.

Every stage call in the Generator goes through `placement.use(stage)`. With all stages
resident (one GPU each, or enough memory) that is a no-op; other placements (e.g. one GPU
taking turns) decide there when a stage's weights are loaded and released.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from collections.abc import AsyncIterator
from dataclasses import dataclass


@dataclass
class SwapCost:
    """What a request waited on weight swaps for (reported in Timings)."""

    swaps: int = 0
    seconds: float = 0.0


class ResidentPlacement:
    """Every stage keeps its weights on its device: nothing to do."""

    @asynccontextmanager
    async def use(self, stage: str, cost: SwapCost | None = None) -> AsyncIterator[None]:
        yield

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass
