"""Typed events, results and server facts the SDK returns, decoded from the protobuf messages.

Spelling: a decoded picture list is `images`/`previews`, its encoded bytes `image_data`/
`preview_data` (as the wire's `Image.data`); every duration and count of a request is in `Timings`.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image

from fluxmesh.contract import Phase
from fluxmesh.v1 import common_pb2, generator_pb2

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
    """Denoising step `step` of `total` done, `seconds` after the previous one."""

    request_id: str
    step: int
    total: int
    seconds: float
    previews: list[Image.Image] = field(default_factory=list)  # one per image, when previews were asked for
    preview_step: int = 0  # the step the previews show (vae previews lag behind `step`)
    preview_data: list[bytes] = field(repr=False, default_factory=list)  # the encoded previews (JPEG)


@dataclass(frozen=True)
class Timings:
    """Seconds spent per phase of one request, and the weight swaps it waited on."""

    queued: float
    encode: float
    denoise: float
    decode: float
    total: float
    swap: float = 0.0  # sequential mode: seconds of weight swaps this request waited on
    swaps: int = 0  # ... and how many (requests of one group share them: do not add them up)
    cached_encodes: int = 0  # encoder calls the orchestrator's prompt cache answered instead


@dataclass(frozen=True)
class Result:
    """The finished request: its images, the seed and settings they came from, and timings."""

    request_id: str
    images: list[Image.Image]
    seed: int
    timings: Timings
    width: int
    height: int
    steps: int
    guidance: float
    image_data: list[bytes] = field(repr=False, default_factory=list)  # the encoded images (PNG), as sent
    warnings: list[str] = field(default_factory=list)
    blocks_skipped: int = 0  # step caching: attention block computations skipped ...
    blocks_run: int = 0  # ... and run (both 0 without step caching)

    @property
    def image(self) -> Image.Image:
        return self.images[0]


@dataclass(frozen=True)
class LoraInfo:
    name: str
    size_bytes: int
    cached: bool  # read and converted already; told only to the orchestrator's admin (else False)


def loras_from_pb(message: common_pb2.ListLorasResponse) -> list[LoraInfo]:
    return [LoraInfo(lora.name, lora.size_bytes, lora.cached) for lora in message.loras]


@dataclass(frozen=True)
class StageInfo:
    """What one stage process holds. An orchestrator that tells its tenants apart gives an ordinary
    token the model's name and facts only: paths, memory, residency and details are its admin's."""

    stage: str  # encoder, denoiser or vae
    model: str  # folder or Hub id
    device: str
    dtype: str
    weight_bytes: int  # bytes of weights held now
    peak_memory_bytes: int  # CUDA peak allocated on an accelerator, peak RSS on CPU
    residency: str  # resident, offloaded (in CPU memory) or released
    details: dict[str, str] = field(default_factory=dict)  # counters: requests, steps_run, threads, ...
    # The model's facts, as the stage reports them (0 / False / empty where it has no such fact):
    size_multiple: int = 0  # denoiser, vae
    vae_scale_factor: int = 0  # vae
    guidance_embeds: bool = False  # denoiser: dev-style guidance embedding
    fill: bool = False  # denoiser: FLUX.1-Fill
    kontext: bool = False  # denoiser: FLUX.1-Kontext
    control: bool = False  # denoiser: FLUX.1-Canny/Depth
    redux: bool = False  # encoder: a FLUX.1-Redux image encoder
    ip_adapter_embed_dim: int = 0  # encoder: its IP-Adapter CLIP vision model's embed width; denoiser: its adapter's
    max_sequence_length: int = 0  # encoder: its default T5 length
    transformer_gguf: str = ""  # denoiser
    latent_rgb: tuple[float, ...] = ()  # vae: the latent -> RGB map of fast previews
    controlnets: tuple[ControlNetInfo, ...] = ()  # denoiser: its ControlNets, as CONTROLNET references name them


@dataclass(frozen=True)
class ControlNetInfo:
    """One of the denoiser's ControlNets (`Reference("controlnet", ..., controlnet=i)` names it)."""

    name: str  # its folder's name
    union_modes: int  # ControlNet-Union: its number of control modes; 0: not a union model
    pixels: bool  # XLabs layout: takes the control image as pixels


@dataclass(frozen=True)
class GeneratorInfo:
    """What `info()` returns: the stages behind the orchestrator and the model's facts."""

    stages: list[StageInfo]
    size_multiple: int  # width and height must be multiples of this
    guidance_embeds: bool  # dev-style (takes guidance) or schnell-style


def info_from_pb(message: generator_pb2.GeneratorInfo) -> GeneratorInfo:
    stages = [
        StageInfo(
            stage=s.stage,
            model=s.model,
            device=s.device,
            dtype=s.dtype,
            weight_bytes=s.weight_bytes,
            peak_memory_bytes=s.peak_memory_bytes,
            residency=s.residency,
            details=dict(s.details),
            size_multiple=s.size_multiple,
            vae_scale_factor=s.vae_scale_factor,
            guidance_embeds=s.guidance_embeds,
            fill=s.fill,
            kontext=s.kontext,
            control=s.control,
            redux=s.redux,
            ip_adapter_embed_dim=s.ip_adapter_embed_dim,
            max_sequence_length=s.max_sequence_length,
            transformer_gguf=s.transformer_gguf,
            latent_rgb=tuple(s.latent_rgb),
            controlnets=tuple(ControlNetInfo(c.name, c.union_modes, c.pixels) for c in s.controlnets),
        )
        for s in message.stages
    ]
    return GeneratorInfo(stages=stages, size_multiple=message.size_multiple, guidance_embeds=message.guidance_embeds)


Event = Queued | StageStarted | StageFinished | Step | Result


def _image(message: common_pb2.Image) -> Image.Image:
    image = Image.open(io.BytesIO(message.data))  # PNG results, JPEG previews: the server sends no other
    image.load()
    return image


class EventDecoder:
    """One request's wire events as SDK events: the pieces of each image (ImageChunk, which the SDK
    asks for so that no message exceeds a stock 4 MiB receive limit) are put back together into
    the Result's images, so callers see the same Result either way."""

    def __init__(self) -> None:
        self._images: list[tuple[generator_pb2.ImageChunk, list[bytes]]] = []  # (first piece, data)
        self._complete = True  # the last image's last piece has arrived

    def decode(self, message: generator_pb2.GenerateEvent) -> Event | None:
        """The event `message` is, or None for an image piece (it joins the Result)."""
        kind = message.WhichOneof("event")
        if kind == "image_chunk":
            chunk = message.image_chunk
            if self._complete:  # a new image begins
                self._images.append((chunk, []))
            self._images[-1][1].append(chunk.data)
            self._complete = chunk.last
            return None
        if kind == "result" and self._images:
            if not self._complete:
                raise ValueError(f"image {len(self._images) - 1} ended before its last piece")
            message.result.images.extend(
                common_pb2.Image(width=first.width, height=first.height, format=first.format, data=b"".join(data))
                for first, data in self._images
            )
        return event_from_pb(message)


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
        return Step(
            rid,
            s.step,
            s.total,
            s.seconds,
            [_image(i) for i in s.previews],
            s.preview_step,
            [i.data for i in s.previews],
        )
    if kind == "result":
        r = message.result
        t = r.timings
        return Result(
            request_id=rid,
            images=[_image(i) for i in r.images],
            seed=r.seed,
            timings=Timings(
                t.queued_seconds,
                t.encode_seconds,
                t.denoise_seconds,
                t.decode_seconds,
                t.total_seconds,
                t.swap_seconds,
                t.swaps,
                t.cached_encodes,
            ),
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance=r.guidance,
            image_data=[i.data for i in r.images],
            warnings=list(r.warnings),
            blocks_skipped=r.step_cache.blocks_skipped,
            blocks_run=r.step_cache.blocks_run,
        )
    raise ValueError(f"unknown event {kind!r}")
