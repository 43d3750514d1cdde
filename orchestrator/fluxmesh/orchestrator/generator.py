"""Generator service: the public API. Validate, queue, Encode -> Denoise -> Decode, relay events."""

from __future__ import annotations

import logging
import time
import uuid

import grpc

from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.orchestrator.placement import ResidentPlacement, SwapCost
from fluxmesh.orchestrator.request import GenerateParams, ModelFacts, check_request
from fluxmesh.orchestrator.stages import DenoiserClient, EncoderClient, VaeClient
from fluxmesh.v1 import (
    denoiser_pb2,
    encoder_pb2,
    generator_pb2,
    generator_pb2_grpc,
    common_pb2,
    vae_pb2,
)

log = logging.getLogger(__name__)

ENCODE, DENOISE, DECODE = generator_pb2.STAGE_ENCODE, generator_pb2.STAGE_DENOISE, generator_pb2.STAGE_DECODE


class Stages:
    """The three stage clients the orchestrator drives."""

    def __init__(self, encoder: EncoderClient, denoiser: DenoiserClient, vae: VaeClient):
        self.encoder, self.denoiser, self.vae = encoder, denoiser, vae

    def all(self):
        return (self.encoder, self.denoiser, self.vae)


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(self, stages: Stages, queue: AdmissionQueue, placement=None):
        self.stages = stages
        self.queue = queue
        self.placement = placement or ResidentPlacement()
        self._facts: ModelFacts | None = None

    async def model_facts(self, timeout: float | None) -> ModelFacts:
        """Size granularity and guidance embedding, asked of the denoiser once it answers."""
        if self._facts is None:
            details = (await self.stages.denoiser.info(timeout=timeout)).details
            self._facts = ModelFacts(
                size_multiple=int(details.get("size_multiple", 16)),
                guidance_embeds=details.get("guidance_embeds", "True") == "True",
            )
        return self._facts

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        request_id = uuid.uuid4().hex[:16]
        started = time.perf_counter()
        params = check_request(request, await self.model_facts(_time_left(context)))

        def event(**kwargs) -> generator_pb2.GenerateEvent:
            return generator_pb2.GenerateEvent(request_id=request_id, **kwargs)

        ticket = self.queue.enter()
        try:
            async for position in self.queue.wait_turn(ticket):
                yield event(queued=generator_pb2.Queued(position=position))
            timings = generator_pb2.Timings(queued_seconds=time.perf_counter() - started)
            log.info("%s: %dx%d, %d steps, seed %d", request_id, params.width, params.height, params.steps, params.seed)

            swaps = SwapCost()
            yield event(stage_started=generator_pb2.StageStarted(stage=ENCODE))
            t0 = time.perf_counter()
            async with self.placement.use("encoder", swaps):
                embeddings = await self.stages.encoder.encode(_encode_request(params), _time_left(context))
            timings.encode_seconds = time.perf_counter() - t0
            yield event(stage_finished=generator_pb2.StageFinished(stage=ENCODE, seconds=timings.encode_seconds))

            yield event(stage_started=generator_pb2.StageStarted(stage=DENOISE))
            t0 = time.perf_counter()
            latents = None
            async with self.placement.use("denoiser", swaps):
                denoising = self.stages.denoiser.denoise(_denoise_request(params, embeddings), _time_left(context))
                async for step in denoising:
                    if step.HasField("step"):
                        s = step.step
                        yield event(step=generator_pb2.Step(step=s.step, total=s.total, seconds=s.seconds))
                    else:
                        latents = step.latents
            timings.denoise_seconds = time.perf_counter() - t0
            yield event(stage_finished=generator_pb2.StageFinished(stage=DENOISE, seconds=timings.denoise_seconds))

            yield event(stage_started=generator_pb2.StageStarted(stage=DECODE))
            t0 = time.perf_counter()
            async with self.placement.use("vae", swaps):
                decoded = await self.stages.vae.decode(
                    vae_pb2.DecodeRequest(latents=latents, width=params.width, height=params.height,
                                          format=common_pb2.IMAGE_FORMAT_PNG),
                    _time_left(context),
                )
            timings.decode_seconds = time.perf_counter() - t0
            yield event(stage_finished=generator_pb2.StageFinished(stage=DECODE, seconds=timings.decode_seconds))

            timings.swaps, timings.swap_seconds = swaps.swaps, swaps.seconds
            timings.total_seconds = time.perf_counter() - started
            yield event(
                result=generator_pb2.Result(
                    images=decoded.images,
                    seed=params.seed,
                    timings=timings,
                    width=params.width,
                    height=params.height,
                    steps=params.steps,
                    guidance=params.guidance,
                    warnings=_truncation_warnings(embeddings, params),
                )
            )
            log.info("%s: done in %.2fs", request_id, timings.total_seconds)
        finally:
            await self.queue.leave(ticket)

    async def ListLoras(self, request, context) -> common_pb2.ListLorasResponse:
        """The denoiser's LoRA directory is the catalogue (CLIP-side parts ride in the same files)."""
        return await self.stages.denoiser.list_loras(_time_left(context) or 10.0)

    async def Info(self, request, context) -> generator_pb2.GeneratorInfo:
        stages = [await client.info(timeout=_time_left(context) or 5.0) for client in self.stages.all()]
        facts = await self.model_facts(_time_left(context))
        return generator_pb2.GeneratorInfo(
            stages=stages, size_multiple=facts.size_multiple, guidance_embeds=facts.guidance_embeds
        )


def _time_left(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline, to pass on to stage calls (gRPC does not do it)."""
    return context.time_remaining()


def _truncation_warnings(embeddings: encoder_pb2.EncodeResponse, params: GenerateParams) -> list[str]:
    dropped = max(embeddings.truncated_tokens, default=0)
    if not dropped:
        return []
    length = embeddings.prompt_embeds.shape[1]
    return [f"prompt truncated: {dropped} T5 tokens beyond max_sequence_length {length} were dropped"]


def _encode_request(params: GenerateParams) -> encoder_pb2.EncodeRequest:
    return encoder_pb2.EncodeRequest(
        prompts=[params.prompt],
        prompts_2=[params.prompt_2] if params.prompt_2 else [],
        max_sequence_length=params.max_sequence_length,
        loras=_loras_pb(params),
    )


def _denoise_request(params: GenerateParams, embeddings: encoder_pb2.EncodeResponse) -> denoiser_pb2.DenoiseRequest:
    return denoiser_pb2.DenoiseRequest(
        prompt_embeds=embeddings.prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        width=params.width,
        height=params.height,
        steps=params.steps,
        guidance=params.guidance,
        seed=params.seed,
        num_images=params.num_images,
        loras=_loras_pb(params),
    )


def _loras_pb(params: GenerateParams) -> list[common_pb2.LoraWeight]:
    return [common_pb2.LoraWeight(name=name, weight=weight) for name, weight in params.loras]
