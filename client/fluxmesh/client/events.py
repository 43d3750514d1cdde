"""Typed events and results the SDK yields, decoded from GenerateEvent messages."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image

from fluxmesh.contract import Phase
from fluxmesh.v1 import generator_pb2, common_pb2

Stage = Phase  # the SDK's name for a request's phase: Stage.encode, Stage.denoise, Stage.decode


@dataclass(frozen=True)
class Queued:
    request_id: str
    position: int


@dataclass(frozen=True)
class StageStarted:
    request_id: str
    stage: Stage


@dataclass(frozen=True)
class StageFinished:
    request_id: str
    stage: Stage
    seconds: float


@dataclass(frozen=True)
class Step:
    request_id: str
    step: int
    total: int
    seconds: float
    previews: list[Image.Image] = field(default_factory=list)  # one per image, when previews were asked for
    preview_step: int = 0  # the step the previews show (vae previews lag behind `step`)
    preview_data: list[bytes] = field(repr=False, default_factory=list)  # the encoded previews (JPEG)


@dataclass(frozen=True)
class Timings:
    queued: float
    encode: float
    denoise: float
    decode: float
    total: float
    swap: float = 0.0
    cached_encodes: int = 0  # encoder calls the orchestrator's prompt cache answered instead


@dataclass(frozen=True)
class Result:
    request_id: str
    images: list[Image.Image]
    seed: int
    timings: Timings
    width: int
    height: int
    steps: int
    guidance: float
    png: list[bytes] = field(repr=False, default_factory=list)
    warnings: list[str] = field(default_factory=list)
    swaps: int = 0  # sequential mode: weight swaps this request waited on

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass(frozen=True)
class LoraInfo:
    name: str
    size_bytes: int
    cached: bool


def loras_from_pb(message) -> list[LoraInfo]:
    return [LoraInfo(l.name, l.size_bytes, l.cached) for l in message.loras]


Event = Queued | StageStarted | StageFinished | Step | Result


def _image(message: common_pb2.Image) -> Image.Image:
    if message.format == common_pb2.IMAGE_FORMAT_RAW_RGB:
        return Image.frombytes("RGB", (message.width, message.height), message.data)
    image = Image.open(io.BytesIO(message.data))
    image.load()
    return image


def event_from_pb(message: generator_pb2.GenerateEvent) -> Event:
    kind = message.WhichOneof("event")
    rid = message.request_id
    if kind == "queued":
        return Queued(rid, message.queued.position)
    if kind == "stage_started":
        return StageStarted(rid, Phase.from_pb(message.stage_started.stage))
    if kind == "stage_finished":
        return StageFinished(rid, Phase.from_pb(message.stage_finished.stage), message.stage_finished.seconds)
    if kind == "step":
        s = message.step
        return Step(rid, s.step, s.total, s.seconds, [_image(i) for i in s.previews], s.preview_step,
                    [i.data for i in s.previews])
    if kind == "result":
        r = message.result
        t = r.timings
        return Result(
            request_id=rid,
            images=[_image(i) for i in r.images],
            seed=r.seed,
            timings=Timings(t.queued_seconds, t.encode_seconds, t.denoise_seconds, t.decode_seconds, t.total_seconds,
                            t.swap_seconds, t.cached_encodes),
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance=r.guidance,
            png=[i.data for i in r.images if i.format != common_pb2.IMAGE_FORMAT_RAW_RGB],
            warnings=list(r.warnings),
            swaps=t.swaps,
        )
    raise ValueError(f"unknown event {kind!r}")
