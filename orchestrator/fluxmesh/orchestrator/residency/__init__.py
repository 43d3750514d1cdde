"""Where the stages' weights live while requests run: every stage call in the Generator goes
through `residency.use(stage)`. `ResidentStrategy` (every stage keeps its weights) and
`SequentialStrategy` (one accelerator taking turns) are the two strategies."""

from fluxmesh.orchestrator.residency.resident import ResidencyStrategy, ResidentStrategy, SwapCost, next_order
from fluxmesh.orchestrator.residency.sequential import SequentialStrategy

__all__ = ["ResidencyStrategy", "ResidentStrategy", "SequentialStrategy", "SwapCost", "next_order"]
