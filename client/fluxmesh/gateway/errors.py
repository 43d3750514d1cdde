"""Errors as OpenAI's error object, with the HTTP status that matches the gRPC code.

The orchestrator already names the field and the reason (`width: 63 must be a multiple of 16
...`); this module only moves that answer into HTTP's vocabulary: the status from Google's
canonical gRPC -> HTTP table, `param` in the OpenAI request's own names (`width` -> `size`,
`num_images` -> `n`, `init_image` -> `image`), `code` the gRPC status name. Every error the
gateway answers goes through `error_response`, so they all look alike.
"""

from __future__ import annotations

import re

import grpc
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fluxmesh.rpc.errors import FluxmeshError

# google.rpc.Code's documented HTTP mapping (code.proto); CANCELLED is nginx's 499 "client closed".
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    504: "timeout_error",
}

# The orchestrator's field names for what the OpenAI request spells otherwise.
OPENAI_PARAMS = {"width": "size", "height": "size", "num_images": "n", "init_image": "image", "mask_image": "mask"}
_FIELD = re.compile(r"^([A-Za-z_][\w.\[\]]*): ")

RETRY_AFTER_SECONDS = 2  # the orchestrator refuses a full queue at once; a short wait usually finds room


class GatewayError(Exception):
    """An answer the gateway gives itself (bad body, unknown model, unknown result id...)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, *, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param=param, code=code), status_code=status, headers=headers)


def from_fluxmesh(error: FluxmeshError) -> tuple[int, dict, dict[str, str]]:
    """(HTTP status, OpenAI error body, headers) for an error the orchestrator answered."""
    status = HTTP_STATUS.get(error.code, 500)
    match = _FIELD.match(error.message)
    param = None
    if match and status in (400, 403, 404):
        field = match.group(1)
        param = OPENAI_PARAMS.get(field, field)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == 429 else {}
    return status, error_body(status, error.message, param=param, code=error.code.name.lower()), headers


def _validation_message(error: dict) -> tuple[str, str | None]:
    location = [str(part) for part in error.get("loc", ()) if part != "body"]
    param = ".".join(location) or None
    kind = error.get("type", "")
    if kind == "json_invalid":
        reason = error.get("ctx", {}).get("error", "")
        return f"the body is not valid JSON ({reason})" if reason else "the body is not valid JSON", None
    if kind == "extra_forbidden":
        return f"{param}: unknown field", param
    if kind == "missing":
        return f"{param}: is required", param
    if kind == "model_attributes_type" or (not location and kind.endswith("_type")):
        return "the body must be a JSON object", None
    return (f"{param}: {error.get('msg', 'invalid')}" if param else error.get("msg", "invalid request")), param


async def _on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    found = exc.errors()
    if any(tuple(e.get("loc", ())) == ("body", "image[]") for e in found):
        return error_response(
            400, "image: one image per edit (fluxmesh starts from one init image)", param="image", code="invalid_value"
        )
    message, param = _validation_message(found[0])
    return error_response(400, message, param=param, code="invalid_value")


async def _on_gateway(request: Request, exc: GatewayError) -> JSONResponse:
    return error_response(exc.status, exc.message, param=exc.param, code=exc.code)


async def _on_fluxmesh(request: Request, exc: FluxmeshError) -> JSONResponse:
    status, body, headers = from_fluxmesh(exc)
    return JSONResponse(body, status_code=status, headers=headers)


async def _on_http(request: Request, exc: HTTPException) -> JSONResponse:
    messages = {
        404: f"no such endpoint: {request.method} {request.url.path}",
        405: f"{request.method} is not allowed on {request.url.path}",
        413: "the request body is larger than this gateway accepts",
    }
    code = {413: "request_too_large", 404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
    return error_response(
        exc.status_code,
        messages.get(exc.status_code, str(exc.detail)),
        code=code,
        headers=getattr(exc, "headers", None),
    )


class DeclaredSizeLimit:
    """413 as an OpenAI error for a body whose Content-Length is over the limit, before reading it.

    Starlette's RequestBodyLimitMiddleware counts the bytes of every body (chunked ones too) but
    answers a declared oversize in plain text; this answers that case in the API's own format."""

    def __init__(self, app, max_body_bytes: int):
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http":
            declared = dict(scope["headers"]).get(b"content-length", b"")
            if declared.isdigit() and int(declared) > self.max_body_bytes:
                response = error_response(
                    413,
                    f"the request body is {int(declared)} bytes; this gateway accepts up to {self.max_body_bytes}",
                    code="request_too_large",
                )
                return await response(scope, receive, send)
        await self.app(scope, receive, send)


def install(app) -> None:
    """Every error the app can raise answers as an OpenAI error object."""
    app.add_exception_handler(RequestValidationError, _on_validation)
    app.add_exception_handler(GatewayError, _on_gateway)
    app.add_exception_handler(FluxmeshError, _on_fluxmesh)
    app.add_exception_handler(HTTPException, _on_http)
