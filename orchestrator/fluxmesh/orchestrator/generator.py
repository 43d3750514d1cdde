"""Generator service: the public API. Validate, queue, Encode -> Denoise -> Decode, relay events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing

import grpc

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.rpc import request_ids, step_cache
from fluxmesh.rpc.security import presented_token
from fluxmesh.orchestrator import deadlines
from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.orchestrator.editing import encode_init
from fluxmesh.orchestrator.references import Capabilities, encode_references, encoder_image_prompts
from fluxmesh.orchestrator.previews import VaePreviews, preview_options, step_events
from fluxmesh.orchestrator.metrics import record_result
from fluxmesh.orchestrator.residency.resident import ResidencyStrategy, ResidentStrategy, SwapCost
from fluxmesh.orchestrator.priorities import PriorityPolicy
from fluxmesh.orchestrator.prompt_cache import PromptCache
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
    def __init__(self, stages: Stages, queue: AdmissionQueue, residency: ResidencyStrategy | None = None, *,
                 request_timeout: float | None = None, priorities: PriorityPolicy | None = None,
                 prompt_cache_bytes: int = 0, limits: Limits = LIMITS):
        self.stages = stages
        self.limits = limits  # the contract's ceilings, as the operator lowered them
        # Exact: the encoder's reply bytes, keyed by the request and the encoder's identity.
        self.prompt_cache = PromptCache(prompt_cache_bytes, lambda: self.stages.encoder.info(timeout=10.0))
        self.queue = queue
        self.priorities = priorities or PriorityPolicy()
        self.request_timeout = request_timeout  # deadline for requests that come without one
        self.residency = residency or ResidentStrategy()
        self._facts: ModelFacts | None = None
        self._latent_rgb: list[float] | None = None  # the vae stage's latent -> RGB map (fast previews)

    async def model_facts(self, timeout: float | None) -> ModelFacts:
        """Size granularity and guidance embedding, asked of the denoiser once it answers."""
        if self._facts is None:
            details = (await self.stages.denoiser.info(timeout=timeout)).details
            encoder = (await self.stages.encoder.info(timeout=timeout)).details
            self._facts = ModelFacts(
                size_multiple=int(details.get("size_multiple", 16)),
                guidance_embeds=details.get("guidance_embeds", "True") == "True",
                fill=details.get("fill", "False") == "True",
                capabilities=Capabilities(kontext=details.get("kontext") == "True",
                                          control=details.get("control") == "True",
                                          redux=encoder.get("redux") == "True"),
            )
        return self._facts

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        # The client's well-formed x-request-id, else a new one: it goes to every stage and log line.
        request_id = request_ids.current() or request_ids.new_request_id()
        request_ids.adopt(request_id)
        deadlines.start(context, self.request_timeout)
        started = time.perf_counter()
        self.priorities.check(request.priority, presented_token(context.invocation_metadata()))
        params = await check_request(request, await self.model_facts(_time_left(context)), self.limits)
        if request.HasField("cache"):
            step_cache.from_pb(request.cache)  # kind and threshold named before any stage runs

        def event(**kwargs) -> generator_pb2.GenerateEvent:
            return generator_pb2.GenerateEvent(request_id=request_id, **kwargs)

        ticket = self.queue.enter(priority=request.priority)
        try:
            async for position in self.queue.wait_turn(ticket, _time_left(context)):
                yield event(queued=generator_pb2.Queued(position=position))
            timings = generator_pb2.Timings(queued_seconds=time.perf_counter() - started)
            log.info("%s: %dx%d, %d steps, seed %d", request_id, params.width, params.height, params.steps, params.seed)

            swaps = SwapCost()
            yield event(stage_started=generator_pb2.StageStarted(stage=ENCODE))
            t0 = time.perf_counter()
            (embeddings, negative), (init, conditioning) = await _both(  # prompt and images on their own stages, at once
                self._encode_prompts(params, swaps, timings, context),
                self._encode_images(params, swaps, context),
            )
            timings.encode_seconds = time.perf_counter() - t0
            yield event(stage_finished=generator_pb2.StageFinished(stage=ENCODE, seconds=timings.encode_seconds))

            yield event(stage_started=generator_pb2.StageStarted(stage=DENOISE))
            t0 = time.perf_counter()
            latents = None
            denoise_request, previews, preview_warning = await self._denoise_plan(params, embeddings, negative, init,
                                                                                  context)
            if conditioning is not None:
                denoise_request.conditioning.CopyFrom(conditioning)
            if request.HasField("cache"):  # checked on arrival; the denoiser holds the ceiling
                denoise_request.cache.CopyFrom(request.cache)
            cache_report = None
            async with self.residency.use("denoiser", swaps):
                denoising = self.stages.denoiser.denoise(denoise_request, _time_left(context))
                # Closed on the spot when the caller goes away: that cancels the Denoise call, so
                # the denoiser stops within a step (left to the garbage collector, it may not).
                async with aclosing(step_events(denoising, previews)) as steps:
                    async for item in steps:
                        if isinstance(item, generator_pb2.Step):
                            yield event(step=item)
                        else:  # the final event: latents, and what step caching skipped
                            latents = item.latents
                            cache_report = item.step_cache if item.HasField("step_cache") else None
            timings.denoise_seconds = time.perf_counter() - t0
            yield event(stage_finished=generator_pb2.StageFinished(stage=DENOISE, seconds=timings.denoise_seconds))

            yield event(stage_started=generator_pb2.StageStarted(stage=DECODE))
            t0 = time.perf_counter()
            async with self.residency.use("vae", swaps):
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
                    step_cache=cache_report,
                    warnings=_truncation_warnings(embeddings, "prompt", bool(params.references.redux))
                    + _truncation_warnings(negative, "negative prompt")
                    + ([preview_warning] if preview_warning else []),
                )
            )
            record_result(timings, params.steps)
            log.info("%s: done in %.2fs", request_id, timings.total_seconds)
        finally:
            await self.queue.leave(ticket)

    async def _encode_prompts(self, params: GenerateParams, swaps: SwapCost, timings: generator_pb2.Timings,
                              context):
        """The prompt's embeddings, and the negative prompt's (or None) for true CFG: two calls, as
        diffusers encodes them apart (one batch could differ from it in the last bits). What the
        prompt cache holds skips the encoder, and its swap when every one of them hit."""
        requests = [_encode_request(params)]
        if params.true_cfg is not None:
            requests.append(_encode_request(params, negative=True))

        async def encode_many(missing: list[encoder_pb2.EncodeRequest]):
            async with self.residency.use("encoder", swaps):
                if len(missing) == 1:
                    return [await self.stages.encoder.encode(missing[0], _time_left(context))]
                return await _both(*(self.stages.encoder.encode(r, _time_left(context)) for r in missing))

        replies, timings.cached_encodes = await self.prompt_cache.encode(requests, encode_many)
        return replies[0], (replies[1] if len(replies) > 1 else None)

    async def _encode_images(self, params: GenerateParams, swaps: SwapCost, context):
        """The init image and the KONTEXT / CONTROL references, in one vae turn (or none at all)."""
        if params.edit is None and not params.references.for_vae:
            return None, None
        async with self.residency.use("vae", swaps):
            init = await encode_init(self.stages.vae, params.edit, width=params.width, height=params.height,
                                     timeout=_time_left(context))
            conditioning = await encode_references(self.stages.vae, params.references, width=params.width,
                                                   height=params.height, timeout=_time_left(context))
        return init, conditioning

    async def _denoise_plan(self, params: GenerateParams, embeddings, negative, init, context):
        """The denoise request (with the init image and preview options, if any), the vae preview
        relay when vae previews run, and a warning when the kind asked for cannot be had."""
        preview, warning = preview_options(
            params.preview, vae_alongside_denoiser=self.residency.stages_stay_loaded,
            latent_rgb=await self._latent_rgb_map(params, context))
        request = _denoise_request(params, embeddings, negative)
        if init is not None:
            request.init.CopyFrom(init)
        if preview is not None:
            request.preview.CopyFrom(preview)
        previews = None
        if preview is not None and preview.x0:
            previews = VaePreviews(lambda x0: self._decode_preview(x0, params, context))
        return request, previews, warning

    async def _decode_preview(self, x0: common_pb2.Tensor, params: GenerateParams, context) -> list[common_pb2.Image]:
        # Its own SwapCost: previews only run where nothing is swapped (vae loaded while denoising).
        async with self.residency.use("vae", SwapCost()):
            reply = await self.stages.vae.decode(
                vae_pb2.DecodeRequest(latents=x0, width=params.width, height=params.height,
                                      format=common_pb2.IMAGE_FORMAT_JPEG, preview=True),
                _time_left(context),
            )
        return list(reply.images)

    async def _latent_rgb_map(self, params: GenerateParams, context) -> list[float]:
        """The vae stage's latent -> RGB map for fast previews, asked once (empty: FLUX.1's)."""
        if params.preview is None or self._latent_rgb:
            return self._latent_rgb or []
        details = (await self.stages.vae.info(timeout=_time_left(context) or 5.0)).details
        if "latent_rgb" in details:
            self._latent_rgb = [float(v) for v in json.loads(details["latent_rgb"])]
        return self._latent_rgb or []

    async def ListLoras(self, request, context) -> common_pb2.ListLorasResponse:
        """The denoiser's LoRA directory is the catalogue (CLIP-side parts ride in the same files)."""
        return await self.stages.denoiser.list_loras(_time_left(context) or 10.0)

    async def Info(self, request, context) -> generator_pb2.GeneratorInfo:
        stages = [await client.info(timeout=_time_left(context) or 5.0) for client in self.stages.all()]
        facts = await self.model_facts(_time_left(context))
        return generator_pb2.GeneratorInfo(
            stages=stages, size_multiple=facts.size_multiple, guidance_embeds=facts.guidance_embeds
        )


async def _both(first, second):
    """Await two calls at once; if one fails, the other is cancelled (and its error dropped)."""
    tasks = [asyncio.ensure_future(first), asyncio.ensure_future(second)]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _time_left(context: grpc.aio.ServicerContext) -> float | None:
    """The caller's remaining deadline, to pass on to stage calls (gRPC does not do it)."""
    return deadlines.time_left(context)


def _truncation_warnings(embeddings: encoder_pb2.EncodeResponse | None, what: str,
                         image_prompts: bool = False) -> list[str]:
    dropped = max(embeddings.truncated_tokens, default=0) if embeddings is not None else 0
    if not dropped:
        return []
    # Redux image tokens follow the T5 part, which is then always REDUX_SEQUENCE_LENGTH long
    length = contract.REDUX_SEQUENCE_LENGTH if image_prompts else embeddings.prompt_embeds.shape[1]
    return [f"{what} truncated: {dropped} T5 tokens beyond max_sequence_length {length} were dropped"]


def _encode_request(params: GenerateParams, *, negative: bool = False) -> encoder_pb2.EncodeRequest:
    prompt, prompt_2 = ((params.true_cfg.negative_prompt, params.true_cfg.negative_prompt_2) if negative
                        else (params.prompt, params.prompt_2))
    request = encoder_pb2.EncodeRequest(
        prompts=[prompt],
        prompts_2=[prompt_2] if prompt_2 else [],
        max_sequence_length=params.max_sequence_length,
        loras=_loras_pb(params),
    )
    if not negative and params.references.redux:  # image prompts join the prompt's T5 sequence
        request.image_prompts.extend(encoder_image_prompts(params.references))
        request.zero_text = not prompt and not prompt_2
    return request


def _denoise_request(params: GenerateParams, embeddings: encoder_pb2.EncodeResponse,
                     negative: encoder_pb2.EncodeResponse | None) -> denoiser_pb2.DenoiseRequest:
    request = denoiser_pb2.DenoiseRequest(
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
    if negative is not None:
        request.negative_prompt_embeds.CopyFrom(negative.prompt_embeds)
        request.negative_pooled_prompt_embeds.CopyFrom(negative.pooled_prompt_embeds)
        request.true_cfg_scale = params.true_cfg.scale
    return request


def _loras_pb(params: GenerateParams) -> list[common_pb2.LoraWeight]:
    return [common_pb2.LoraWeight(name=name, weight=weight) for name, weight in params.loras]
