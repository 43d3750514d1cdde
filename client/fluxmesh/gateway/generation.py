"""One OpenAI images request run through the SDK: its arguments, its answer, its event stream.

The gateway adds no pipeline logic: an OpenAI body becomes the SDK's keyword arguments, the
SDK's events become either one JSON answer or server-sent events as OpenAI streams them
(`image_generation.partial_image` carrying fluxmesh's previews, then one
`image_generation.completed` per image; `image_edit.*` for edits).
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, TypeVar

from starlette.requests import Request

from fluxmesh.client import (
    AsyncClient,
    Event,
    FluxmeshError,
    Queued,
    Result,
    StageStarted,
    Step,
)
from fluxmesh.client.options import parse_lora
from fluxmesh.gateway.encoding import MEDIA_TYPES, encode
from fluxmesh.gateway.errors import GatewayError, error_body, from_fluxmesh
from fluxmesh.gateway.schemas import Generation, ImageOptions, LoraSpec
from fluxmesh.gateway.store import ResultStore

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    """A validated request: what to ask the SDK for, and how to answer."""

    options: ImageOptions
    arguments: dict[str, Any]  # keyword arguments of AsyncClient.stream
    event_prefix: str  # "image_generation" or "image_edit"
    created: int = field(default_factory=lambda: int(time.time()))


def make_job(
    options: ImageOptions,
    *,
    event_prefix: str,
    init_image: bytes | None = None,
    mask_image: bytes | None = None,
    strength: float | None = None,
) -> Job:
    if options.output_compression is not None and options.output_format == "png":
        raise GatewayError(
            400,
            "output_compression: applies to jpeg and webp only (PNG is lossless)",
            param="output_compression",
            code="invalid_value",
        )
    width, height = options.dimensions()
    arguments: dict[str, Any] = {
        "prompt": options.prompt,
        "prompt_2": options.prompt_2,
        "width": width,
        "height": height,
        "steps": options.steps,
        "guidance": options.guidance,
        "seed": options.seed,
        "num_images": options.n,
        "max_sequence_length": options.max_sequence_length,
        "loras": [_lora(lora) for lora in options.loras],
        "priority": options.priority,
        "negative_prompt": options.negative_prompt,
        "true_cfg_scale": options.true_cfg_scale,
        "cache": options.cache,
        "timeout": options.timeout,
    }
    if init_image is not None:
        arguments.update(init_image=init_image, mask_image=mask_image, strength=strength)
    if options.stream and options.partial_images:
        # A preview at every step: which ones become partial images is chosen once the step
        # count is known (an edit's strength shortens the schedule).
        arguments.update(preview=options.preview, preview_every=1)
    return Job(options, arguments, event_prefix)


def _lora(lora: LoraSpec | str) -> tuple[str, float]:
    return parse_lora(lora) if isinstance(lora, str) else (lora.name, lora.weight)


async def events(client: AsyncClient, job: Job) -> AsyncGenerator[Event, None]:
    """The SDK's events; leaving early (an error, a client gone) cancels the generation."""
    stream = client.stream(**job.arguments)
    finished = False
    try:
        async for event in stream:
            yield event
        finished = True
    finally:
        if not finished:
            stream.cancel()  # the orchestrator stops the denoiser within a step


async def until_disconnected(request: Request) -> None:
    """Returns when the HTTP client goes away (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancelled_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or cancel it when the client disconnects first."""
    task, gone = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (task, gone):
            if not pending.done():
                pending.cancel()
    if not task.done() or task.cancelled():
        await asyncio.gather(task, return_exceptions=True)
        raise GatewayError(499, "the client closed the connection; the generation was cancelled")
    return task.result()


async def collect(client: AsyncClient, job: Job) -> Result:
    async with aclosing(events(client, job)) as stream:
        async for event in stream:
            if isinstance(event, Result):
                return event
    raise GatewayError(502, "the orchestrator's stream ended without a result")


def _generation(result: Result) -> Generation:
    t = result.timings
    return Generation(
        seed=result.seed,
        width=result.width,
        height=result.height,
        steps=result.steps,
        guidance=result.guidance,
        warnings=result.warnings,
        blocks_skipped=result.blocks_skipped,
        blocks_run=result.blocks_run,
        timings={"queued": t.queued, "encode": t.encode, "denoise": t.denoise, "decode": t.decode, "total": t.total},
    )


def _image_data(data: bytes, job: Job, store: ResultStore, base_url: str) -> dict[str, str]:
    fmt = job.options.output_format
    encoded = encode(data, fmt, job.options.output_compression)
    if job.options.response_format == "url":
        try:
            key = store.put(encoded, MEDIA_TYPES[fmt])
        except ValueError as error:
            raise GatewayError(
                400, f"response_format: {error}; ask for b64_json", param="response_format", code="invalid_value"
            ) from None
        return {"url": f"{base_url}v1/images/results/{key}.{fmt}"}
    return {"b64_json": base64.b64encode(encoded).decode("ascii")}


def images_response(result: Result, job: Job, store: ResultStore, base_url: str) -> dict[str, Any]:
    return {
        "created": job.created,
        "data": [_image_data(png, job, store, base_url) for png in result.image_data],
        "output_format": job.options.output_format,
        "size": f"{result.width}x{result.height}",
        "background": "opaque",
        "fluxmesh": _generation(result).model_dump(),
    }


def sse(name: str, payload: dict[str, Any]) -> str:
    """One server-sent event (a JSON payload has no newlines, so one data line is enough)."""
    return f"event: {name}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"


class PartialImages:
    """Which previews become partial images: `wanted` of them, evenly spread over the steps."""

    def __init__(self, wanted: int):
        self.wanted, self.sent = wanted, 0

    def take(self, step: Step) -> bool:
        if not step.preview_data or self.sent >= self.wanted:
            return False
        shown = step.preview_step or step.step
        return shown >= math.ceil(step.total * (self.sent + 1) / (self.wanted + 1))


async def stream_events(
    first: Event, rest: AsyncGenerator[Event, None], job: Job, store: ResultStore, base_url: str
) -> AsyncIterator[str]:
    """The SSE body; an error after the stream began is an `error` event (the status is sent)."""
    options, prefix = job.options, job.event_prefix
    partials = PartialImages(options.partial_images if options.stream else 0)

    def encoded(data: bytes) -> str:
        return base64.b64encode(encode(data, options.output_format, options.output_compression)).decode("ascii")

    async def relay(event: Event) -> AsyncIterator[str]:
        if isinstance(event, Queued) and options.progress:
            yield sse("fluxmesh.queued", {"type": "fluxmesh.queued", "position": event.position})
        elif isinstance(event, StageStarted) and options.progress:
            yield sse("fluxmesh.stage", {"type": "fluxmesh.stage", "stage": event.stage.value})
        elif isinstance(event, Step):
            if options.progress:
                yield sse(
                    "fluxmesh.step",
                    {"type": "fluxmesh.step", "step": event.step, "total": event.total, "seconds": event.seconds},
                )
            if partials.take(event):
                for image_index, data in enumerate(event.preview_data):
                    yield sse(
                        f"{prefix}.partial_image",
                        {
                            "type": f"{prefix}.partial_image",
                            "b64_json": encoded(data),
                            "created_at": int(time.time()),
                            "output_format": options.output_format,
                            "size": options.size,
                            "background": "opaque",
                            "quality": "auto",
                            "partial_image_index": partials.sent,
                            "image_index": image_index,
                            "step": event.preview_step or event.step,
                        },
                    )
                partials.sent += 1
        elif isinstance(event, Result):
            generation = _generation(event).model_dump()
            for data in event.image_data:
                yield sse(
                    f"{prefix}.completed",
                    {
                        "type": f"{prefix}.completed",
                        **_image_data(data, job, store, base_url),
                        "created_at": int(time.time()),
                        "output_format": options.output_format,
                        "size": f"{event.width}x{event.height}",
                        "background": "opaque",
                        "quality": "auto",
                        "fluxmesh": generation,
                    },
                )

    try:
        async for text in relay(first):
            yield text
        async for event in rest:
            async for text in relay(event):
                yield text
    except FluxmeshError as error:
        status, body, _ = from_fluxmesh(error)
        yield sse("error", {"type": "error", "status": status, **body})
    except GatewayError as error:
        body = error_body(error.status, error.message, param=error.param, code=error.code)
        yield sse("error", {"type": "error", "status": error.status, **body})
    finally:
        await rest.aclose()
