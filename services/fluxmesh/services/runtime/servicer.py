"""What the three stage servicers share: the engine, its model thread, the accepted-request count
and the Info answer. A servicer adds its own RPCs (protobuf in -> engine types -> protobuf out)
and the facts its Info reports."""

from __future__ import annotations

from typing import Any

from fluxmesh.contract import Stage
from fluxmesh.services.previews.jpeg import Jpeg
from fluxmesh.services.residency.state import residency_state
from fluxmesh.services.runtime.info import stage_info
from fluxmesh.services.runtime.worker import ModelWorker
from fluxmesh.v1 import common_pb2


class StageServicer:
    stage: Stage

    def __init__(self, engine: Any, model_name: str):
        self.engine = engine
        self.model_name = model_name
        self.requests = 0  # accepted requests, reported by Info
        self.worker = ModelWorker(self.stage)

    async def info_facts(self) -> dict[str, Any]:
        """The stage's own facts for Info, as StageInfo's typed fields (overridden)."""
        return {}

    def info_counters(self) -> dict[str, int | float]:
        watch = getattr(self.engine, "compile_watch", None)  # --compile: graphs and seconds
        return {"requests": self.requests, **(watch.details() if watch is not None else {})}

    def warm_up(self) -> None:
        """On the model thread, before the stage reports SERVING (--compile)."""
        warm_up = getattr(self.engine, "warm_up", None)
        if warm_up is not None:
            warm_up()

    async def Info(self, request: common_pb2.InfoRequest, context) -> common_pb2.StageInfo:
        return stage_info(
            self.stage,
            self.model_name,
            self.engine.device,
            self.engine.weight_bytes(),
            residency=residency_state(self.engine),
            counters=self.info_counters(),
            **await self.info_facts(),
        )


def jpeg_pb(images: list[Jpeg]) -> list[common_pb2.Image]:
    """Preview JPEGs as the wire's Image messages."""
    return [
        common_pb2.Image(width=i.width, height=i.height, format=common_pb2.IMAGE_FORMAT_JPEG, data=i.data)
        for i in images
    ]
