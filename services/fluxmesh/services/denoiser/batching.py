"""Step-level continuous batching: requests join a running batch at the next step boundary and
leave it when their last step is done.

Compatible requests (`BatchKey`: same size, text length, mode, LoRA set; no step caching)
share one transformer forward per step (loop.forward); each keeps its own scheduler, sigmas,
step count, guidance, seed, previews and cancellation (loop.Lane). A cancelled request leaves at
the next step boundary; the others carry on.

One driver runs on the stage's model thread while any request is waiting or running: each turn
it admits the requests that arrived (preparing their lanes: the noise is drawn there, on the one
torch thread), picks the next group round-robin, steps that group's oldest lanes together — at
most `max_batch` rows — and hands finished, failed and cancelled requests their answers.

Latency: the oldest lanes of a group are the ones stepped, so a request is never pushed out of
a running batch by later ones, and a batch is bounded by `max_batch` rows, which bounds how much
a joining request can slow a running one: a request's latency is at most its steps times the
step time at `max_batch` (plus the other groups' turns). The default, `DEFAULT_MAX_BATCH` in
fluxmesh.contract, is chosen from bench/throughput.py (docs/benchmarks.md).

Kontext, Control and IP-Adapter requests run their pipeline's own loop (engine.batchable), all
steps at once, while the batch waits (an IP-Adapter's processors and scale are set on the shared
transformer for every row, so it batches with nobody: denoiser/ip_adapter.py); so do step-cached requests: diffusers' cache hooks keep their state
in the shared transformer and decide per forward (FirstBlockCache: one mean over the whole
batch), so a batch-mate would change a caching request's image. Caching requests therefore
batch with nobody, not even with the same policy (step_cache.py).

Different LoRA sets do not share a forward: the adapters live in the shared transformer's
layers (PEFT), scaled per layer, not per sample, so they group by LoRA set (see
docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fluxmesh.contract import DEFAULT_MAX_BATCH
from fluxmesh.services.denoiser.loop import Lane, forward
from fluxmesh.services.runtime.worker import ModelWorker

if TYPE_CHECKING:
    from fluxmesh.services.denoiser.engine import (
        DenoiseJob,
        DenoiserEngine,
        StepCallback,
    )

__all__ = ["BatchKey", "Batcher", "Denoised"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchKey:
    """What must be equal for two requests to share a transformer forward."""

    width: int
    height: int
    text_length: int
    mode: str  # text-to-image, image-to-image, inpainting, fill (Fill has more input channels)
    loras: tuple[tuple[str, float], ...]

    @classmethod
    def of(cls, lane: Lane) -> BatchKey:
        job = lane.job
        return cls(job.width, job.height, lane.embeds.shape[1], lane.mode.name, tuple(job.loras))


@dataclass(eq=False)
class _Ticket:
    """A request handed to the driver, and where its answer goes."""

    job: DenoiseJob
    on_step: StepCallback | None
    cancelled: threading.Event
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    lane: Lane | None = None
    key: BatchKey | None = None

    def answer(self, result: Denoised | None = None, error: BaseException | None = None) -> None:
        """From the model thread: resolve the future on its loop (unless its caller left)."""

        def resolve() -> None:
            if self.future.done():
                return
            if error is not None:
                self.future.set_exception(error)
            else:
                self.future.set_result(result)

        self.loop.call_soon_threadsafe(resolve)


@dataclass(frozen=True)
class Denoised:
    """A request's answer: its packed latents, and (step-cached requests) attention blocks
    (run, skipped)."""

    latents: torch.Tensor
    blocks: tuple[int, int] | None = None


@dataclass
class BatchStats:
    """What the driver did (Info reports it; tests read it)."""

    forwards: int = 0  # transformer forwards run
    lane_steps: int = 0  # request-steps they computed
    largest: int = 0  # most requests in one forward
    joined_running: int = 0  # requests admitted while others were mid-way


class Batcher:
    def __init__(self, engine: DenoiserEngine, worker: ModelWorker, max_batch: int = DEFAULT_MAX_BATCH):
        if max_batch < 1:
            raise ValueError(f"max_batch {max_batch} must be >= 1")
        self.engine = engine
        self.worker = worker
        self.max_batch = max_batch
        self.stats = BatchStats()
        self._lock = threading.Lock()
        self._pending: list[_Ticket] = []
        self._driving = False
        self._driver: asyncio.Future | None = None

    async def denoise(
        self, job: DenoiseJob, on_step: StepCallback | None = None, cancelled: threading.Event | None = None
    ) -> Denoised:
        """The request's packed latents, computed in whatever batch it can join. Raises
        `Cancelled` at the step boundary after `cancelled` is set."""
        loop = asyncio.get_running_loop()
        ticket = _Ticket(job, on_step, cancelled or threading.Event(), loop, loop.create_future())
        with self._lock:
            self._pending.append(ticket)
            start = not self._driving
            self._driving = True
        if start:
            self._driver = asyncio.ensure_future(self.worker.run_unchecked(self._drive))
            # Its failure reached every request it held (_drive); retrieve it so none is logged twice.
            self._driver.add_done_callback(lambda done: done.cancelled() or done.exception())
        return await ticket.future

    # -- on the model thread ---------------------------------------------------------------

    def _drive(self) -> None:
        lanes: list[_Ticket] = []
        turn = 0
        last_loras: tuple | None = None
        try:
            while True:
                with self._lock:
                    arrived, self._pending = self._pending, []
                    if not arrived and not lanes:
                        self._driving = False
                        return
                running = bool(lanes)
                for ticket in arrived:
                    if not self.engine.batchable(ticket.job):
                        self._run_exclusively(ticket)
                        last_loras = None  # it activated its own set
                    elif self._admit(ticket):
                        self.stats.joined_running += running and any(t.lane.index > 0 for t in lanes)
                        lanes.append(ticket)
                lanes = self._retire(lanes)
                if not lanes:
                    continue
                groups: dict[BatchKey, list[_Ticket]] = {}
                for ticket in lanes:  # oldest first, so groups are ordered by their oldest request
                    groups.setdefault(ticket.key, []).append(ticket)
                key = list(groups)[turn % len(groups)]
                turn += 1
                batch = self._fill(groups[key])
                try:
                    if key.loras != last_loras:
                        # Adapters live in the shared transformer: this group's set, right before its forward.
                        self.engine.loras.activate(list(key.loras))
                        last_loras = key.loras
                    forward(self.engine.transformer, [t.lane for t in batch])
                except Exception as error:  # noqa: BLE001 - the forward failed for every lane in it
                    last_loras = None  # a failed activation leaves LoRAs disabled
                    log.warning("denoise batch of %d failed: %s", len(batch), error)
                    for ticket in batch:
                        ticket.lane.error = error
                self.stats.forwards += 1
                self.stats.lane_steps += len(batch)
                self.stats.largest = max(self.stats.largest, len(batch))
                lanes = self._retire(lanes)
        except BaseException as error:  # the driver itself broke: nobody may wait forever
            with self._lock:
                stranded, self._pending = self._pending, []
                self._driving = False
            for ticket in lanes + stranded:
                ticket.answer(error=error)
            raise

    def _admit(self, ticket: _Ticket) -> bool:
        """Prepare the request's lane; answer at once if it cannot run."""
        try:
            if self.worker.precondition is not None:
                self.worker.precondition()  # the weights are on the device (Residency)
            ticket.lane = self.engine.lane(ticket.job, ticket.on_step, ticket.cancelled)
            ticket.key = BatchKey.of(ticket.lane)
        except Exception as error:  # noqa: BLE001 - this request's answer
            ticket.answer(error=error)
            return False
        return True

    def _run_exclusively(self, ticket: _Ticket) -> None:
        """A request outside the shared loop — Kontext and Control (their pipeline's own loop),
        step-cached ones (the hooks' state lives in the shared transformer) — runs all its steps
        at once; the batch waits for it."""
        try:
            if self.worker.precondition is not None:
                self.worker.precondition()
            engine, job = self.engine, ticket.job
            if not job.in_pipeline:  # step-cached
                latents, blocks = engine.denoise_cached(job, ticket.on_step, ticket.cancelled)
                ticket.answer(result=Denoised(latents, blocks))
            else:
                ticket.answer(result=Denoised(engine.denoise(job, ticket.on_step, ticket.cancelled)))
        except Exception as error:  # noqa: BLE001 - this request's answer
            ticket.answer(error=error)

    def _fill(self, group: list[_Ticket]) -> list[_Ticket]:
        """The group's oldest lanes, up to max_batch rows (always at least the oldest)."""
        batch, rows = [], 0
        for ticket in group:
            if batch and rows + ticket.lane.rows > self.max_batch:
                break
            batch.append(ticket)
            rows += ticket.lane.rows
        return batch

    @staticmethod
    def _retire(lanes: list[_Ticket]) -> list[_Ticket]:
        """Answer the lanes that are done, failed or cancelled; keep the rest in order."""
        kept = []
        for ticket in lanes:
            lane = ticket.lane
            if (error := lane.error or lane.cancellation()) is not None:
                ticket.answer(error=error)
            elif lane.done:
                ticket.answer(result=Denoised(lane.latents))
            else:
                kept.append(ticket)
        return kept


def stats_details(batcher: Batcher) -> dict[str, int]:
    """The batcher's figures for the stage's Info details."""
    stats = batcher.stats
    return {
        "max_batch": batcher.max_batch,
        "forwards": stats.forwards,
        "lane_steps": stats.lane_steps,
        "largest_batch": stats.largest,
        "joined_running": stats.joined_running,
    }
