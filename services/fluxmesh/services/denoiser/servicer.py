"""Denoiser service: streams a StepEvent per step, then the packed latents.

The loop runs on the model thread, shared with compatible requests (batching.py); through
`ModelWorker.stream` each step's event is made there and reaches the caller as it happens; if
the caller cancels or disconnects, the request stops at the next step boundary.
"""

from __future__ import annotations

from typing import Any

from fluxmesh import contract
from fluxmesh.contract import DEFAULT_MAX_BATCH, Stage
from fluxmesh.services.denoiser.batching import Batcher, stats_details
from fluxmesh.services.denoiser.edits import conditioning_from_pb, init_from_pb, preview_from_pb
from fluxmesh.services.denoiser.engine import DenoiseJob, DenoiserEngine
from fluxmesh.services.denoiser.ip_adapter import ip_adapter_from_pb
from fluxmesh.services.denoiser.previews import StepPreview
from fluxmesh.services.denoiser.step_cache import policy_from_pb
from fluxmesh.services.runtime.info import lora_listing
from fluxmesh.services.runtime.metrics import record_step
from fluxmesh.services.runtime.servicer import StageServicer, jpeg_pb
from fluxmesh.services.runtime.tensors import from_pb, to_pb
from fluxmesh.v1 import common_pb2, denoiser_pb2, denoiser_pb2_grpc


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
        negative_prompt_embeds=(
            from_pb(request.negative_prompt_embeds, "negative_prompt_embeds", ndim=3)
            if request.HasField("negative_prompt_embeds")
            else None
        ),
        negative_pooled_prompt_embeds=(
            from_pb(request.negative_pooled_prompt_embeds, "negative_pooled_prompt_embeds", ndim=2)
            if request.HasField("negative_pooled_prompt_embeds")
            else None
        ),
        true_cfg_scale=request.true_cfg_scale or 1.0,
        conditioning=conditioning_from_pb(request),
        cache=policy_from_pb(request.cache) if request.HasField("cache") else None,
        ip_adapter=ip_adapter_from_pb(request),
    )


class DenoiserServicer(StageServicer, denoiser_pb2_grpc.DenoiserServicer):
    stage = Stage.denoiser
    engine: DenoiserEngine

    def __init__(self, engine: DenoiserEngine, model_name: str, *, max_batch: int = DEFAULT_MAX_BATCH):
        super().__init__(engine, model_name)
        self.batcher = Batcher(engine, self.worker, max_batch)  # compatible requests share each step
        self.steps_run = 0  # total steps computed by this process: tests read it through Info

    async def Denoise(self, request: denoiser_pb2.DenoiseRequest, context):
        job = job_from_pb(request)
        self.engine.check(job)
        self.requests += 1
        async with self.worker.stream(self.batcher.denoise, job, convert=self._step_event) as steps:
            async for event in steps:
                yield denoiser_pb2.DenoiseEvent(step=event)
            denoised = steps.result
            final = denoiser_pb2.DenoiseEvent(latents=to_pb(denoised.latents))
            if denoised.blocks is not None:  # what step caching skipped
                final.step_cache.blocks_run, final.step_cache.blocks_skipped = denoised.blocks
            yield final

    def _step_event(
        self, step: int, total: int, seconds: float, preview: StepPreview | None = None
    ) -> denoiser_pb2.StepEvent:
        """On the model thread: the step's event, previews serialised there, off the event loop."""
        self.steps_run += 1
        record_step(seconds)
        event = denoiser_pb2.StepEvent(step=step, total=total, seconds=seconds)
        if preview is not None:
            event.previews.extend(jpeg_pb(preview.images))
            if preview.x0 is not None:
                event.x0.CopyFrom(to_pb(preview.x0))
        return event

    async def ListLoras(self, request, context) -> common_pb2.ListLorasResponse:
        return lora_listing(self.engine.loras)

    async def info_facts(self) -> dict[str, Any]:
        return {
            "guidance_embeds": self.engine.guidance_embeds,
            "fill": self.engine.fill,  # FLUX.1-Fill: needs an init image and a mask
            "kontext": self.engine.kontext,  # FLUX.1-Kontext: KONTEXT references
            "control": self.engine.control,  # FLUX.1-Canny/Depth: needs a CONTROL reference
            "controlnets": self.engine.controlnets.info(),  # --controlnet: CONTROLNET references
            "transformer_gguf": str(self.engine.transformer_gguf or ""),
            "size_multiple": self.engine.size_multiple,
            # XLabs IP-Adapter (--ip-adapter): the CLIP embed width its projection takes
            "ip_adapter_embed_dim": self.engine.ip_adapter.embed_dim if self.engine.ip_adapter else 0,
        }

    def warm_up(self) -> None:
        self.engine.warm_up(self.batcher.max_batch)

    def info_counters(self) -> dict[str, int | float]:
        return {**super().info_counters(), "steps_run": self.steps_run, **stats_details(self.batcher)}
