"""The StageInfo every stage answers from its Info RPC."""

from __future__ import annotations

from fluxmesh.services.runtime import Placement, peak_memory_bytes
from fluxmesh.v1 import common_pb2


def stage_info(stage: str, model: str, placement: Placement, weight_bytes: int, *, residency: str = "",
               **details) -> common_pb2.StageInfo:
    """`residency`: "resident", "offloaded" or "released" (see fluxmesh.services.residency)."""
    return common_pb2.StageInfo(
        stage=stage,
        model=model,
        dtype=str(placement.dtype).removeprefix("torch."),
        device=str(placement.device),
        weight_bytes=weight_bytes,
        peak_memory_bytes=peak_memory_bytes(placement.device),
        details={key: str(value) for key, value in details.items()},
        residency=residency,
    )


def lora_listing(loras) -> common_pb2.ListLorasResponse:
    return common_pb2.ListLorasResponse(
        loras=[common_pb2.LoraInfo(name=n, size_bytes=size, cached=cached) for n, size, cached in loras.listing()]
    )
