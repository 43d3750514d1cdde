"""VAE previews: decode the denoiser's x0 estimates on the vae stage while denoising goes on.

Never on the denoising path: `offer` returns at once; at most one preview decode is in flight
per request, and an x0 that arrives meanwhile replaces the one waiting (a stale preview is
skipped, never queued). Decoded previews come out of `ready()` as they finish, and `interleave`
merges them with the denoiser's events, so each reaches the client as soon as it exists. When
denoising ends, `close` cancels what is still in flight: the final decode never waits for a
preview.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass

from fluxmesh.v1 import common_pb2, denoiser_pb2, generator_pb2

log = logging.getLogger(__name__)

Decode = Callable[[common_pb2.Tensor], Awaitable[list[common_pb2.Image]]]


@dataclass(frozen=True)
class DecodedPreview:
    step: int  # the step whose x0 estimate these images show
    images: list[common_pb2.Image]


class VaePreviews:
    def __init__(self, decode: Decode):
        self._decode = decode
        self._in_flight: asyncio.Task | None = None
        self._waiting: tuple[int, common_pb2.Tensor] | None = None
        self._ready: asyncio.Queue[DecodedPreview] = asyncio.Queue()
        self.skipped = 0  # x0 estimates replaced before their turn (tests and logs read it)
        self.failed = 0

    def offer(self, step: int, x0: common_pb2.Tensor) -> None:
        """Take the x0 estimate of `step`; returns at once."""
        if self._in_flight is None:
            self._start(step, x0)
        else:
            if self._waiting is not None:
                self.skipped += 1
            self._waiting = (step, x0)

    async def ready(self) -> DecodedPreview:
        return await self._ready.get()

    async def close(self) -> None:
        """Drop what waits, cancel what is in flight (its result would come too late)."""
        self._waiting = None
        task, self._in_flight = self._in_flight, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _start(self, step: int, x0: common_pb2.Tensor) -> None:
        self._in_flight = asyncio.ensure_future(self._run(step, x0))

    async def _run(self, step: int, x0: common_pb2.Tensor) -> None:
        try:
            images = await self._decode(x0)
            self._ready.put_nowait(DecodedPreview(step, images))
        except asyncio.CancelledError:
            raise
        except Exception as error:  # a lost preview is not worth failing the request for
            self.failed += 1
            log.warning("vae preview of step %d failed: %s", step, error)
        self._in_flight = None
        if self._waiting is not None:
            waiting, self._waiting = self._waiting, None
            self._start(*waiting)


async def interleave(events: AsyncIterator, previews: VaePreviews | None) -> AsyncIterator:
    """`events` as they come, with decoded previews (`DecodedPreview`) slotted in as they finish.
    Closes `events` and `previews` when `events` ends or the consumer leaves."""
    if previews is None:
        async with aclosing(events):  # closed now, not whenever the garbage collector gets to it
            async for event in events:
                yield event
        return
    iterator = events.__aiter__()
    next_event = asyncio.ensure_future(iterator.__anext__())
    next_preview = asyncio.ensure_future(previews.ready())
    try:
        while True:
            done, _ = await asyncio.wait({next_event, next_preview}, return_when=asyncio.FIRST_COMPLETED)
            if next_preview in done:
                yield next_preview.result()
                next_preview = asyncio.ensure_future(previews.ready())
            if next_event in done:
                try:
                    event = next_event.result()
                except StopAsyncIteration:
                    return
                yield event
                next_event = asyncio.ensure_future(iterator.__anext__())
    finally:
        for task in (next_event, next_preview):
            task.cancel()
        await asyncio.gather(next_event, next_preview, return_exceptions=True)
        await previews.close()
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


async def step_events(denoising: AsyncIterator, previews: VaePreviews | None) -> AsyncIterator:
    """The denoiser's events as public `Step` events, then the final DenoiseEvent (latents).

    Fast previews ride in their step's event; x0 estimates go to `previews` and come back, once
    decoded, in a Step event of their own that repeats the latest step (seconds 0) and names the
    step they show in `preview_step`."""
    last = generator_pb2.Step()
    async with aclosing(interleave(denoising, previews)) as items:
        async for item in items:
            if isinstance(item, DecodedPreview):
                yield generator_pb2.Step(step=last.step, total=last.total, previews=item.images, preview_step=item.step)
            elif item.HasField("step"):
                s = item.step
                if previews is not None and s.HasField("x0"):
                    previews.offer(s.step, s.x0)
                last = generator_pb2.Step(
                    step=s.step,
                    total=s.total,
                    seconds=s.seconds,
                    previews=s.previews,
                    preview_step=s.step if len(s.previews) else 0,
                )
                yield last
            else:
                yield item


def preview_options(preview, *, vae_alongside_denoiser: bool, latent_rgb: list[float]):
    """What to ask of the denoiser for a request's `PreviewParams` (None: no previews), and a
    warning when vae previews cannot be had: in sequential mode the VAE is not loaded while the
    denoiser runs, so fast previews stand in."""
    if preview is None:
        return None, None
    if preview.kind == "vae" and vae_alongside_denoiser:
        return denoiser_pb2.PreviewOptions(every=preview.every, x0=True), None
    warning = None
    if preview.kind == "vae":
        warning = "vae previews need the VAE loaded while denoising (not so in sequential mode): sent fast previews"
    return denoiser_pb2.PreviewOptions(every=preview.every, fast=True, latent_rgb=latent_rgb), warning
