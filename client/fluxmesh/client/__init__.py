"""fluxmesh client SDK: grpcio, protobuf and pillow only (no torch).

from fluxmesh.client import Client
with Client("localhost:50050") as client:
    result = client.generate("a red fox in the snow", width=1024, height=1024, seed=7)
    result.image.save("fox.png")
"""

from fluxmesh.client.aio import AsyncClient, AsyncGenerationStream
from fluxmesh.client.events import (
    ControlNetInfo,
    Event,
    GeneratorInfo,
    LoraInfo,
    Queued,
    Result,
    Stage,
    StageFinished,
    StageInfo,
    StageStarted,
    Step,
    Timings,
)
from fluxmesh.client.options import GenerateOptions, ImageInput, PreviewKind, Reference, ReferenceRole
from fluxmesh.client.sync import Client, GenerationStream
from fluxmesh.rpc.errors import FluxmeshError

__all__ = [
    "AsyncClient",
    "AsyncGenerationStream",
    "Client",
    "ControlNetInfo",
    "Event",
    "FluxmeshError",
    "GenerateOptions",
    "GenerationStream",
    "GeneratorInfo",
    "ImageInput",
    "LoraInfo",
    "PreviewKind",
    "Queued",
    "Reference",
    "ReferenceRole",
    "Result",
    "Stage",
    "StageFinished",
    "StageInfo",
    "StageStarted",
    "Step",
    "Timings",
]
