"""The StageInfo every stage answers from its Info RPC."""

from __future__ import annotations

import torch

from fluxmesh.services.runtime.device import Device
from fluxmesh.services.runtime.memory import peak_memory_bytes
from fluxmesh.v1 import common_pb2


def stage_info(
    stage: str,
    model: str,
    device: Device,
    weight_bytes: int,
    *,
    residency: str = "",
    counters: dict[str, int | float] | None = None,
    **facts,
) -> common_pb2.StageInfo:
    """`residency`: a fluxmesh.contract.WeightState; `facts`: StageInfo's typed fields (size_multiple,
    guidance_embeds, ...); `counters` go to `details`, for people and tests."""
    return common_pb2.StageInfo(
        stage=stage,
        model=model,
        dtype=str(device.dtype).removeprefix("torch."),
        device=str(device.torch_device),
        weight_bytes=weight_bytes,
        peak_memory_bytes=peak_memory_bytes(device.torch_device),
        # threads: what the process computes with (--threads, `fluxmesh up`'s share, or torch's)
        details={key: str(value) for key, value in {"threads": torch.get_num_threads(), **(counters or {})}.items()},
        residency=residency,
        **facts,
    )


def lora_listing(loras) -> common_pb2.ListLorasResponse:
    return common_pb2.ListLorasResponse(
        loras=[common_pb2.LoraInfo(name=n, size_bytes=size, cached=cached) for n, size, cached in loras.listing()]
    )
