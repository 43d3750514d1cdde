"""Denoiser service: streams a StepEvent per step, then the packed latents.

The loop runs on the model thread, shared with compatible requests (batching.py); step
callbacks hop onto the event loop through a queue so
events reach the caller as they happen. If the caller cancels or disconnects, the loop is told
through a threading.Event and stops at the next step boundary, freeing the stage.
"""

from __future__ import annotations

import asyncio
import threading

from fluxmesh import contract
from fluxmesh.services.denoiser.batching import DEFAULT_MAX_BATCH, Batcher, stats_details
from fluxmesh.services.denoiser.edits import conditioning_from_pb, init_from_pb, preview_from_pb
from fluxmesh.services.denoiser.engine import DenoiseJob, DenoiserEngine
from fluxmesh.services.denoiser.step_cache import policy_from_pb
from fluxmesh.services.runtime.info import lora_listing, stage_info
from fluxmesh.services.runtime.metrics import record_step
from fluxmesh.services.residency.state import residency_state
from fluxmesh.services.runtime.tensors import from_pb, to_pb
from fluxmesh.services.runtime.worker import ModelWorker
from fluxmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, common_pb2

_DONE = object()


def job_from_pb(request: denoiser_pb2.DenoiseRequest) -> DenoiseJob:
    return DenoiseJob(
        prompt_embeds=from_pb(request.prompt_embeds, "prompt_embeds", ndim=3),
        pooled_prompt_embeds=from_pb(request.pooled_prompt_embeds, "pooled_prompt_embeds", ndim=2),
        width=request.width,
        height=request.height,
        steps=request.steps,
        guidance=request.guidance,
        seed=request.seed,
        num_images=request.num_images or 1,
        loras=contract.check_loras(request.loras),  # counted before it is walked
        init=init_from_pb(request),
        preview=preview_from_pb(request),
        negative_prompt_embeds=(from_pb(request.negative_prompt_embeds, "negative_prompt_embeds", ndim=3)
                                if request.HasField("negative_prompt_embeds") else None),
        negative_pooled_prompt_embeds=(from_pb(request.negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds",
                                               ndim=2) if request.HasField("negative_pooled_prompt_embeds") else None),
        true_cfg_scale=request.true_cfg_scale or 1.0,
        conditioning=conditioning_from_pb(request),
        cache=policy_from_pb(request.cache) if request.HasField("cache") else None,
    )


class DenoiserServicer(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, engine: DenoiserEngine, model_name: str, *, max_batch: int = DEFAULT_MAX_BATCH):
        self.engine = engine
        self.model_name = model_name
        self.requests = 0  # accepted requests, reported by Info
        self.worker = ModelWorker("denoiser")
        self.batcher = Batcher(engine, self.worker, max_batch)  # compatible requests share each step
        self.steps_run = 0  # total steps computed by this process: tests read it through Info

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest, context):
        job = job_from_pb(request)
        self.engine.check(job)
        self.requests += 1
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def on_step(step: int, total: int, seconds: float, preview=None) -> None:
            self.steps_run += 1
            record_step(seconds)
            event = denoiser_pb2.StepEvent(step=step, total=total, seconds=seconds)
            if preview is not None:  # serialised here, on the model thread, off the event loop
                event.previews.extend(preview.images)
                if preview.x0 is not None:
                    event.x0.CopyFrom(to_pb(preview.x0))
            loop.call_soon_threadsafe(events.put_nowait, event)

        task = asyncio.ensure_future(self.batcher.denoise(job, on_step, cancelled))
        task.add_done_callback(lambda _: loop.call_soon_threadsafe(events.put_nowait, _DONE))
        try:
            while (event := await events.get()) is not _DONE:
                yield denoiser_pb2.DenoiseEvent(step=event)
            denoised = task.result()
            final = denoiser_pb2.DenoiseEvent(latents=to_pb(denoised.latents))
            if denoised.blocks is not None:
                final.step_cache.blocks_run, final.step_cache.blocks_skipped = denoised.blocks
            yield final
        finally:
            # Reached on success, on error and when the caller goes away (CancelledError).
            cancelled.set()
            if not task.done():
                await asyncio.shield(asyncio.wait([task]))
            if not task.cancelled():
                task.exception()  # retrieved: the Cancelled a caller's departure causes is expected

    async def ListLoras(self, request, context) -> common_pb2.ListLorasResponse:
        return lora_listing(self.engine.loras)

    async def Info(self, request, context) -> common_pb2.StageInfo:
        return stage_info(
            "denoiser",
            self.model_name,
            self.engine.device,
            self.engine.weight_bytes(),
            residency=residency_state(self.engine),
            guidance_embeds=self.engine.guidance_embeds,
            fill=self.engine.fill,  # FLUX.1-Fill: needs an init image and a mask
            kontext=self.engine.kontext,  # FLUX.1-Kontext: KONTEXT references
            control=self.engine.control,  # FLUX.1-Canny/Depth: needs a CONTROL reference
            transformer_gguf=self.engine.transformer_gguf or "",
            size_multiple=self.engine.size_multiple,
            steps_run=self.steps_run,
            requests=self.requests,
            **stats_details(self.batcher),
        )
