"""The HTTP endpoints: a routing table; the work is in generation.py, the answers' shapes in schemas.py."""

from __future__ import annotations

from contextlib import AsyncExitStack
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Form, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse

from fluxmesh.client import AsyncClient
from fluxmesh.contract import model_id
from fluxmesh.gateway import page
from fluxmesh.gateway.errors import GatewayError
from fluxmesh.gateway.generation import (
    Job,
    cancelled_on_disconnect,
    collect,
    events,
    images_response,
    make_job,
    stream_events,
)
from fluxmesh.gateway.schemas import (
    ErrorResponse,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOptions,
    ImagesResponse,
    LoraList,
    ModelCard,
    ModelList,
)
from fluxmesh.rpc.security import presented_token, token_matches

router = APIRouter()

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in (
        (400, "Invalid request (param names the field)"),
        (401, "Missing or wrong token"),
        (403, "Not allowed for this token"),
        (404, "Unknown model, LoRA or result"),
        (413, "Body too large"),
        (415, "Wrong content type"),
        (429, "Queue full (see Retry-After)"),
        (503, "Orchestrator or a stage unavailable"),
        (504, "Deadline exceeded"),
    )
}
STREAM_OR_JSON: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The images (JSON), or with `stream: true` server-sent events: "
        "`image_generation.partial_image` ..., then `image_generation.completed` "
        "per image (`image_edit.*` for edits); `error` if it fails midway.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def token(request: Request) -> str | None:
    """The caller's bearer token, passed on to the orchestrator (which decides)."""
    header = request.headers.get("authorization")
    if header is None:
        presented = None
    else:
        presented = presented_token([("authorization", header)])
        if not presented:
            raise GatewayError(401, "Authorization must be 'Bearer <token>'", code="unauthenticated")
    accepted = request.app.state.options.tokens
    if accepted and not token_matches(presented, accepted):
        raise GatewayError(
            401, "missing bearer token" if presented is None else "invalid bearer token", code="unauthenticated"
        )
    return presented


Token = Annotated[str | None, Depends(token)]


def content_type(*allowed: str):
    def check(request: Request) -> None:
        given = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if given not in allowed:
            raise GatewayError(
                415,
                f"Content-Type {given or '(none)'!r}: this endpoint takes {' or '.join(allowed)}",
                code="unsupported_media_type",
            )

    return Depends(check)


async def model_card(client: AsyncClient, request: Request) -> ModelCard:
    info = await client.info()
    denoiser = next((s for s in info.stages if s.stage == "denoiser"), None)
    source = denoiser.model if denoiser is not None else ""
    fill = denoiser is not None and denoiser.fill
    name = request.app.state.options.model_name or model_id(source)
    card = ModelCard(
        id=name,
        kind="fill" if fill else "dev" if info.guidance_embeds else "schnell",
        size_multiple=info.size_multiple,
        guidance_embeds=info.guidance_embeds,
        source=source,
    )
    request.app.state.model_ids = {card.id, source}
    return card


async def _check_model(options: ImageOptions, client: AsyncClient, request: Request) -> None:
    if options.model is None or options.model in request.app.state.model_ids:
        return
    await model_card(client, request)  # the orchestrator may serve another model since we last asked
    if options.model not in request.app.state.model_ids:
        raise GatewayError(
            404,
            f"model: {options.model!r} is not served here (GET /v1/models lists it)",
            param="model",
            code="model_not_found",
        )


async def _answer(request: Request, job: Job, bearer: str | None) -> Response:
    state = request.app.state
    base_url = str(request.base_url)
    async with AsyncExitStack() as stack:
        client = await stack.enter_async_context(state.upstream.client(bearer))
        await _check_model(job.options, client, request)
        if not job.options.stream:
            result = await cancelled_on_disconnect(request, collect(client, job))
            return JSONResponse(images_response(result, job, state.store, base_url))
        stream = events(client, job)
        # The first event comes after the orchestrator's checks: a refused request gets its HTTP
        # status (400, 401, 429, ...) instead of a 200 stream that carries an error.
        first = await cancelled_on_disconnect(request, anext(stream))
        held = stack.pop_all()  # the client stays checked out until the stream ends

    async def body():
        async with held:
            async for text in stream_events(first, stream, job, state.store, base_url):
                yield text

    return StreamingResponse(
        body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


@router.post(
    "/v1/images/generations",
    response_model=ImagesResponse,
    responses={**STREAM_OR_JSON, **ERRORS},
    dependencies=[content_type("application/json")],
    tags=["images"],
)
async def create_image(body: ImageGenerationRequest, request: Request, bearer: Token) -> Response:
    """Text to image (OpenAI's `images.generate`), with fluxmesh's knobs as extra fields."""
    return await _answer(request, make_job(body, event_prefix="image_generation"), bearer)


@router.post(
    "/v1/images/edits",
    response_model=ImagesResponse,
    responses={**STREAM_OR_JSON, **ERRORS},
    dependencies=[content_type("multipart/form-data")],
    tags=["images"],
)
async def edit_image(form: Annotated[ImageEditRequest, Form()], request: Request, bearer: Token) -> Response:
    """Image to image, or inpainting with a mask (OpenAI's `images.edit`); Fill models too."""
    image = await form.image.read()
    mask = await form.mask.read() if form.mask is not None else None
    job = make_job(form, event_prefix="image_edit", init_image=image, mask_image=mask, strength=form.strength)
    return await _answer(request, job, bearer)


@router.get(
    "/v1/images/results/{name}",
    responses={200: {"content": {"image/png": {}, "image/jpeg": {}, "image/webp": {}}}, 404: ERRORS[404]},
    response_class=Response,
    tags=["images"],
)
async def result(name: str, request: Request) -> Response:
    """An image made with `response_format: url` (kept for a while; the URL is the only key)."""
    stored = request.app.state.store.get(name.partition(".")[0])
    if stored is None:
        raise GatewayError(404, "no such result (results expire; ask again)", code="not_found")
    return Response(stored.data, media_type=stored.media_type, headers={"Cache-Control": "private, max-age=600"})


@router.get("/v1/models", response_model=ModelList, responses=ERRORS, tags=["models"])
async def list_models(request: Request, bearer: Token) -> ModelList:
    """The model the stages serve: its kind, size granularity and guidance embedding."""
    async with request.app.state.upstream.client(bearer) as client:
        return ModelList(data=[await model_card(client, request)])


@router.get("/v1/models/{model_id:path}", response_model=ModelCard, responses=ERRORS, tags=["models"])
async def get_model(model_id: str, request: Request, bearer: Token) -> ModelCard:
    async with request.app.state.upstream.client(bearer) as client:
        card = await model_card(client, request)
    if model_id not in request.app.state.model_ids:
        raise GatewayError(404, f"model: {model_id!r} is not served here", param="model", code="model_not_found")
    return card


@router.get("/v1/loras", response_model=LoraList, responses=ERRORS, tags=["models"])
async def list_loras(request: Request, bearer: Token) -> LoraList:
    """The LoRAs requests may name (`loras: [{"name": ..., "weight": ...}]`)."""
    async with request.app.state.upstream.client(bearer) as client:
        loras = await client.list_loras()
    return LoraList(data=[{"name": lora.name, "size_bytes": lora.size_bytes, "cached": lora.cached} for lora in loras])


@router.get("/health", tags=["gateway"])
async def health() -> dict[str, str]:
    """The gateway answers (it does not ask the orchestrator: its health is `fluxmesh health`)."""
    return {"status": "ok"}


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def index() -> HTMLResponse:
    return HTMLResponse(page.read("index.html"), headers={"Content-Security-Policy": page.CSP})


@router.get("/page/{name}", include_in_schema=False)
async def asset(name: str) -> Response:
    return page.asset(name)
