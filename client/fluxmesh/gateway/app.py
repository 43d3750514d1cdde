"""The gateway's ASGI app: OpenAI's images API and the web page, in front of one orchestrator."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from starlette.middleware.body_limit import RequestBodyLimitMiddleware

from fluxmesh.gateway import errors
from fluxmesh.gateway.routes import router
from fluxmesh.gateway.store import ResultStore
from fluxmesh.gateway.upstream import Upstream

log = logging.getLogger(__name__)

# Room for an init image and a mask at the orchestrator's 32 MiB each, and the form's other fields.
DEFAULT_MAX_BODY_BYTES = 65 * 2**20


@dataclass(frozen=True)
class GatewayOptions:
    orchestrator: str = "localhost:50050"
    credentials: grpc.ChannelCredentials | None = None  # TLS to the orchestrator
    allow_plaintext_token: bool = False  # pass callers' tokens on in the clear beyond loopback
    tokens: tuple[str, ...] = field(default=(), repr=False)  # when set, checked here too before passing on
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    cors_origins: tuple[str, ...] = ()  # none: browsers allow only the gateway's own page
    result_store_bytes: int = 256 * 2**20
    result_ttl: float = 600.0
    model_name: str | None = None  # the id /v1/models shows (default: the model folder's name or Hub id)


def create_app(options: GatewayOptions) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.upstream = Upstream(
            options.orchestrator,
            credentials=options.credentials,
            allow_plaintext_token=options.allow_plaintext_token,
        )
        try:
            yield
        finally:
            await app.state.upstream.close()

    # No /docs or /redoc: FastAPI's load Swagger UI and ReDoc from a CDN; /openapi.json stays.
    app = FastAPI(
        title="fluxmesh",
        version="1",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        description="OpenAI-compatible images API in front of a fluxmesh orchestrator, and a web "
        "page at /. `Authorization: Bearer` tokens are passed on to the orchestrator.",
    )
    app.state.options = options
    app.state.store = ResultStore(max_bytes=options.result_store_bytes, ttl=options.result_ttl)
    app.state.model_ids = set()
    errors.install(app)
    app.include_router(router)
    _document_multipart(app)
    # Bodies are counted as they arrive (chunked ones too); a declared oversize is refused unread.
    app.add_middleware(RequestBodyLimitMiddleware, max_body_size=options.max_body_bytes)
    app.add_middleware(errors.DeclaredSizeLimit, max_body_bytes=options.max_body_bytes)
    if options.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(options.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


def _document_multipart(app: FastAPI) -> None:
    """FastAPI documents a form model that holds files as url-encoded; the edits endpoint takes
    (and is checked to take) multipart/form-data only, so /openapi.json says that."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()  # FastAPI keeps it as app.openapi_schema: changed once, served as changed
        for operation in (op for path in schema["paths"].values() for op in path.values()):
            content = operation.get("requestBody", {}).get("content", {})
            if "application/x-www-form-urlencoded" in content:
                content["multipart/form-data"] = content.pop("application/x-www-form-urlencoded")
        return schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented way to extend the schema
