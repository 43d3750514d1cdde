"""Generator service: the public API. Validate, queue, Encode -> Denoise -> Decode, relay events.

One request, in order: `check_request` (request.py, against the contract and the model's facts),
the admission queue (admission.py), then three timed phases — encode (the prompts through the
prompt cache and the encoder, the init image through the vae, at once), denoise (steps relayed as
they come, previews slotted in: previews.py), decode — each holding its stage through the
residency strategy (residency/), and the result (its images in pieces first when the client
asked: results.py).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from dataclasses import dataclass, field

import grpc

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits, Phase, Stage
from fluxmesh.orchestrator.admission import AdmissionQueue
from fluxmesh.orchestrator.controlnets import ControlNetFacts
from fluxmesh.orchestrator.deadlines import Deadline
from fluxmesh.orchestrator.disclosure import Disclosure
from fluxmesh.orchestrator.ip_adapter import denoiser_ip_adapter, encoder_ip_adapter_image
from fluxmesh.orchestrator.metrics import record_result
from fluxmesh.orchestrator.previews import VaePreviews, preview_options, step_events
from fluxmesh.orchestrator.priorities import PriorityPolicy
from fluxmesh.orchestrator.prompt_cache import PromptCache
from fluxmesh.orchestrator.references import Capabilities, encode_references, encoder_image_prompts
from fluxmesh.orchestrator.request import GenerateParams, ModelFacts, check_request
from fluxmesh.orchestrator.residency.resident import ResidencyStrategy, ResidentStrategy, SwapCost
from fluxmesh.orchestrator.results import image_chunks
from fluxmesh.orchestrator.stages import Stages
from fluxmesh.rpc import request_ids, step_cache
from fluxmesh.rpc.security import presented_token
from fluxmesh.v1 import common_pb2, denoiser_pb2, encoder_pb2, generator_pb2, generator_pb2_grpc, vae_pb2

log = logging.getLogger(__name__)

INFO_TIMEOUT = 5.0  # Info and ListLoras calls that come without a deadline
LIST_LORAS_TIMEOUT = 10.0


@dataclass
class _Run:
    """One admitted request on its way through the phases: what each leaves for the next."""

    request_id: str
    params: GenerateParams
    deadline: Deadline
    timings: generator_pb2.Timings
    swaps: SwapCost = field(default_factory=SwapCost)
    embeddings: encoder_pb2.EncodeResponse | None = None
    negative: encoder_pb2.EncodeResponse | None = None  # true CFG's negative prompt
    init: denoiser_pb2.InitImage | None = None
    conditioning: denoiser_pb2.Conditioning | None = None  # Kontext reference / Control image
    cache: common_pb2.StepCache | None = None  # the request's step caching, if it chose
    latents: common_pb2.Tensor | None = None
    step_cache: common_pb2.StepCacheReport | None = None  # what step caching skipped
    images: list[common_pb2.Image] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def event(self, **kwargs) -> generator_pb2.GenerateEvent:
        return generator_pb2.GenerateEvent(request_id=self.request_id, **kwargs)


class GeneratorServicer(generator_pb2_grpc.GeneratorServicer):
    def __init__(
        self,
        stages: Stages,
        queue: AdmissionQueue,
        residency: ResidencyStrategy | None = None,
        *,
        request_timeout: float | None = None,
        priorities: PriorityPolicy | None = None,
        prompt_cache_bytes: int = 0,
        limits: Limits = LIMITS,
        disclosure: Disclosure | None = None,
    ):
        self.stages = stages
        self.disclosure = disclosure or Disclosure()  # who sees counters, paths and `cached`
        self.limits = limits  # the contract's ceilings, as the operator lowered them
        # Exact: the encoder's reply bytes, keyed by the request and the encoder's identity.
        self.prompt_cache = PromptCache(prompt_cache_bytes, lambda: self.stages.encoder.info(timeout=10.0))
        self.queue = queue
        self.priorities = priorities or PriorityPolicy()
        self.request_timeout = request_timeout  # deadline for requests that come without one
        self.residency = residency or ResidentStrategy()
        self._facts: ModelFacts | None = None
        self._latent_rgb: list[float] | None = None  # the vae stage's latent -> RGB map (fast previews)

    async def model_facts(self, deadline: Deadline) -> ModelFacts:
        """Size granularity, guidance embedding, Fill and the family's capabilities, asked of the
        three stages (at once) once they answer."""
        if self._facts is None:
            denoiser, encoder, vae = await _together(
                self.stages.denoiser.info(timeout=deadline.left(INFO_TIMEOUT)),
                self.stages.encoder.info(timeout=deadline.left(INFO_TIMEOUT)),
                self.stages.vae.info(timeout=deadline.left(INFO_TIMEOUT)),
            )
            self._facts = ModelFacts(
                size_multiple=denoiser.size_multiple or ModelFacts.size_multiple,  # 0: a stage that does not say
                guidance_embeds=denoiser.guidance_embeds,
                fill=denoiser.fill,
                capabilities=Capabilities(
                    kontext=denoiser.kontext,
                    control=denoiser.control,
                    redux=encoder.redux,
                    controlnets=tuple(ControlNetFacts.from_pb(net) for net in denoiser.controlnets),
                    ip_adapter_encoder_dim=encoder.ip_adapter_embed_dim,
                    ip_adapter_denoiser_dim=denoiser.ip_adapter_embed_dim,
                    depth=vae.depth,
                ),
            )
        return self._facts

    async def Generate(self, request: generator_pb2.GenerateRequest, context: grpc.aio.ServicerContext):
        # The client's well-formed x-request-id, else a new one: it goes to every stage and log line.
        request_id = request_ids.current() or request_ids.new_request_id()
        request_ids.adopt(request_id)
        deadline = Deadline.of_call(context, self.request_timeout)
        started = time.perf_counter()
        self.priorities.check(request.priority, presented_token(context.invocation_metadata()))
        params = await check_request(request, await self.model_facts(deadline), self.limits)
        if request.HasField("cache"):
            step_cache.from_pb(request.cache)  # kind and threshold named before any stage runs

        ticket = self.queue.enter(priority=request.priority)
        try:
            async for position in self.queue.wait_turn(ticket, deadline.left()):
                yield generator_pb2.GenerateEvent(request_id=request_id, queued=generator_pb2.Queued(position=position))
            run = _Run(
                request_id,
                params,
                deadline,
                generator_pb2.Timings(queued_seconds=time.perf_counter() - started),
                cache=request.cache if request.HasField("cache") else None,
            )
            log.info("%s: %dx%d, %d steps, seed %d", request_id, params.width, params.height, params.steps, params.seed)
            for phase, work in (
                (Phase.encode, self._encode),
                (Phase.denoise, self._denoise),
                (Phase.decode, self._decode),
            ):
                # Closed on the spot when the caller goes away: that cancels the stage call in
                # progress (a Denoise stops within a step; left to the garbage collector, it may not).
                async with aclosing(_timed(run, phase, work(run))) as events:
                    async for event in events:
                        yield event
            timings = run.timings
            timings.swaps, timings.swap_seconds = run.swaps.swaps, run.swaps.seconds
            timings.total_seconds = time.perf_counter() - started
            if request.stream_images:  # results.py: every message within a stock client's limit
                for chunk in image_chunks(run.images):
                    yield run.event(image_chunk=chunk)
            yield run.event(
                result=generator_pb2.Result(
                    images=[] if request.stream_images else run.images,
                    seed=params.seed,
                    timings=timings,
                    width=params.width,
                    height=params.height,
                    steps=params.steps,
                    guidance=params.guidance,
                    step_cache=run.step_cache,
                    warnings=_truncation_warnings(run.embeddings, "prompt", bool(params.references.redux))
                    + _truncation_warnings(run.negative, "negative prompt")
                    + run.warnings,
                )
            )
            record_result(timings, params.steps)
            log.info("%s: done in %.2fs", request_id, timings.total_seconds)
        finally:
            await self.queue.leave(ticket)

    # -- encode: the prompts and the images, each on its own stage, at once ---------------------

    async def _encode(self, run: _Run) -> None:
        (run.embeddings, run.negative), (run.init, run.conditioning) = await _together(
            self._encode_prompts(run), self._encode_images(run)
        )

    async def _encode_prompts(self, run: _Run):
        """The prompt's embeddings, and the negative prompt's (or None) for true CFG: two calls, as
        diffusers encodes them apart (one batch could differ from it in the last bits). What the
        prompt cache holds skips the encoder, and its swap when every one of them hit."""
        requests = [_encode_request(run.params)]
        if run.params.true_cfg is not None:
            requests.append(_encode_request(run.params, negative=True))

        async def encode_many(missing: list[encoder_pb2.EncodeRequest]):
            async with self.residency.use(Stage.encoder, run.swaps):
                return await _together(*(self.stages.encoder.encode(r, run.deadline.left()) for r in missing))

        replies, run.timings.cached_encodes = await self.prompt_cache.encode(requests, encode_many)
        return replies[0], (replies[1] if len(replies) > 1 else None)

    async def _encode_images(self, run: _Run):
        """The init image and the KONTEXT / CONTROL references, in one vae turn (or none at all)."""
        params = run.params
        if params.edit is None and not params.references.for_vae:
            return None, None
        async with self.residency.use(Stage.vae, run.swaps):
            init = await self._encode_init(run)
            conditioning = await encode_references(
                self.stages.vae,
                params.references,
                width=params.width,
                height=params.height,
                timeout=run.deadline.left(),
            )
        return init, conditioning

    async def _encode_init(self, run: _Run) -> denoiser_pb2.InitImage | None:
        """The init image (and mask) through the vae stage's Encode, as the denoiser takes it (the
        caller holds the vae's turn)."""
        edit, params = run.params.edit, run.params
        if edit is None:
            return None
        encoded = await self.stages.vae.encode_image(
            vae_pb2.EncodeImageRequest(
                image=edit.init_image, mask=edit.mask_image, width=params.width, height=params.height, fill=edit.fill
            ),
            run.deadline.left(),
        )
        init = denoiser_pb2.InitImage(posterior=encoded.posterior, strength=edit.strength)
        if edit.inpainting:
            init.masked_posterior.CopyFrom(encoded.masked_posterior)
            init.mask.CopyFrom(encoded.mask)
        return init

    # -- denoise: steps relayed as they come, previews slotted in -------------------------------

    async def _denoise(self, run: _Run) -> AsyncIterator[generator_pb2.GenerateEvent]:
        request, previews = await self._denoise_plan(run)
        async with self.residency.use(Stage.denoiser, run.swaps):
            denoising = self.stages.denoiser.denoise(request, run.deadline.left())
            async with aclosing(step_events(denoising, previews)) as steps:
                async for item in steps:
                    if isinstance(item, generator_pb2.Step):
                        yield run.event(step=item)
                    else:  # the final event: latents, and what step caching skipped
                        run.latents = item.latents
                        run.step_cache = item.step_cache if item.HasField("step_cache") else None

    async def _denoise_plan(self, run: _Run) -> tuple[denoiser_pb2.DenoiseRequest, VaePreviews | None]:
        """The denoise request (with the init image and preview options, if any) and the vae
        preview relay when vae previews run; a warning when the kind asked for cannot be had."""
        params = run.params
        preview, warning = preview_options(
            params.preview,
            vae_alongside_denoiser=self.residency.stages_stay_loaded,
            latent_rgb=await self._latent_rgb_map(run),
        )
        if warning:
            run.warnings.append(warning)
        request = _denoise_request(params, run.embeddings, run.negative)
        if run.init is not None:
            request.init.CopyFrom(run.init)
        if run.conditioning is not None:
            request.conditioning.CopyFrom(run.conditioning)
        if run.cache is not None:  # checked on arrival; the denoiser holds the ceiling
            request.cache.CopyFrom(run.cache)
        if preview is not None:
            request.preview.CopyFrom(preview)
        previews = None
        if preview is not None and preview.x0:
            previews = VaePreviews(lambda x0: self._decode_preview(x0, run))
        return request, previews

    async def _decode_preview(self, x0: common_pb2.Tensor, run: _Run) -> list[common_pb2.Image]:
        # Its own SwapCost: previews only run where nothing is swapped (vae loaded while denoising).
        async with self.residency.use(Stage.vae, SwapCost()):
            reply = await self.stages.vae.decode(
                vae_pb2.DecodeRequest(
                    latents=x0,
                    width=run.params.width,
                    height=run.params.height,
                    format=common_pb2.IMAGE_FORMAT_JPEG,
                    preview=True,
                ),
                run.deadline.left(),
            )
        return list(reply.images)

    async def _latent_rgb_map(self, run: _Run) -> list[float]:
        """The vae stage's latent -> RGB map for fast previews, asked once (empty: FLUX.1's)."""
        if run.params.preview is None or self._latent_rgb:
            return self._latent_rgb or []
        self._latent_rgb = list((await self.stages.vae.info(timeout=run.deadline.left(INFO_TIMEOUT))).latent_rgb)
        return self._latent_rgb

    # -- decode ------------------------------------------------------------------------------

    async def _decode(self, run: _Run) -> None:
        async with self.residency.use(Stage.vae, run.swaps):
            decoded = await self.stages.vae.decode(
                vae_pb2.DecodeRequest(
                    latents=run.latents,
                    width=run.params.width,
                    height=run.params.height,
                    format=common_pb2.IMAGE_FORMAT_PNG,
                ),
                run.deadline.left(),
            )
        run.images = list(decoded.images)

    # -- the other RPCs ----------------------------------------------------------------------

    async def ListLoras(self, request, context) -> common_pb2.ListLorasResponse:
        """The denoiser's LoRA directory is the catalogue (CLIP-side parts ride in the same files)."""
        reply = await self.stages.denoiser.list_loras(Deadline.of_call(context).left(LIST_LORAS_TIMEOUT))
        return self.disclosure.loras(reply, context.invocation_metadata())

    async def Info(self, request, context) -> generator_pb2.GeneratorInfo:
        """The three stages' Info, asked at once."""
        deadline = Deadline.of_call(context)
        *stages, facts = await _together(
            *(client.info(timeout=deadline.left(INFO_TIMEOUT)) for client in self.stages.all()),
            self.model_facts(deadline),
        )
        info = generator_pb2.GeneratorInfo(
            stages=stages, size_multiple=facts.size_multiple, guidance_embeds=facts.guidance_embeds
        )
        return self.disclosure.info(info, context.invocation_metadata())


async def _timed(
    run: _Run, phase: Phase, work: AsyncIterator | Awaitable
) -> AsyncIterator[generator_pb2.GenerateEvent]:
    """A phase between its started and finished events, its seconds in the request's Timings.
    `work` is the phase's own events (an async iterator) or a call with none to send."""
    yield run.event(stage_started=generator_pb2.StageStarted(stage=phase.pb))
    started = time.perf_counter()
    if inspect.isawaitable(work):
        await work
    else:
        async with aclosing(work) as events:
            async for event in events:
                yield event
    seconds = time.perf_counter() - started
    setattr(run.timings, f"{phase}_seconds", seconds)
    yield run.event(stage_finished=generator_pb2.StageFinished(stage=phase.pb, seconds=seconds))


async def _together(*calls: Awaitable) -> list:
    """Await calls at once; if one fails, the others are cancelled (and their errors dropped)."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _truncation_warnings(
    embeddings: encoder_pb2.EncodeResponse | None, what: str, image_prompts: bool = False
) -> list[str]:
    dropped = max(embeddings.truncated_tokens, default=0) if embeddings is not None else 0
    if not dropped:
        return []
    # Redux image tokens follow the T5 part, which is then always REDUX_SEQUENCE_LENGTH long
    length = contract.REDUX_SEQUENCE_LENGTH if image_prompts else embeddings.prompt_embeds.shape[1]
    return [f"{what} truncated: {dropped} T5 tokens beyond max_sequence_length {length} were dropped"]


def _encode_request(params: GenerateParams, *, negative: bool = False) -> encoder_pb2.EncodeRequest:
    prompt, prompt_2 = (
        (params.true_cfg.negative_prompt, params.true_cfg.negative_prompt_2)
        if negative
        else (params.prompt, params.prompt_2)
    )
    request = encoder_pb2.EncodeRequest(
        prompts=[prompt],
        prompts_2=[prompt_2] if prompt_2 else [],
        max_sequence_length=params.max_sequence_length,
        loras=_loras_pb(params),
    )
    if not negative and params.references.redux:  # image prompts join the prompt's T5 sequence
        request.image_prompts.extend(encoder_image_prompts(params.references))
        request.zero_text = not prompt and not prompt_2
    if params.references.ip_adapter is not None:  # its CLIP embeds come back beside the text's
        request.ip_adapter_image.CopyFrom(
            encoder_ip_adapter_image(
                params.references.ip_adapter, negative=negative, width=params.width, height=params.height
            )
        )
    return request


def _denoise_request(
    params: GenerateParams, embeddings: encoder_pb2.EncodeResponse, negative: encoder_pb2.EncodeResponse | None
) -> denoiser_pb2.DenoiseRequest:
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
    if params.references.ip_adapter is not None:
        request.ip_adapter.CopyFrom(denoiser_ip_adapter(params.references.ip_adapter, embeddings, negative))
    return request


def _loras_pb(params: GenerateParams) -> list[common_pb2.LoraWeight]:
    return [common_pb2.LoraWeight(name=name, weight=weight) for name, weight in params.loras]
