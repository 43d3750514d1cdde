"""The HTTP gateway, driven as OpenAI clients drive it: the official `openai` package against a
gateway process in front of the shared tiny-model cluster, raw HTTP for what that package never
sends, and the same request through the gRPC SDK as the oracle (byte-equal PNG)."""

from __future__ import annotations

import base64
import functools
import io
import ssl
import subprocess
import sys

import grpc
import httpx
import openai
import pytest
from PIL import Image

from factories import PROMPT
from fluxmesh.cli.lifeline import child_environment
from fluxmesh.cli.supervisor import free_port
from fluxmesh.client import Client
from fluxmesh.gateway.errors import HTTP_STATUS, from_fluxmesh
from fluxmesh.gateway.store import ResultStore
from fluxmesh.rpc.errors import FluxmeshError
from gateway_process import Gateway, token_orchestrator
from mesh import exited, wait_settled, wait_until

TOKEN = "gateway-test-token"


@pytest.fixture(scope="module")
def gateway(dev_cluster, tmp_path_factory):
    """A gateway in front of the shared cluster; a 1 MiB body limit so the 413 test stays cheap."""
    process = Gateway(
        dev_cluster.address,
        "--max-body-mib",
        "1",
        "--result-ttl",
        "60",
        log=tmp_path_factory.mktemp("gateway") / "gateway.log",
    )
    yield process
    output = process.stop()
    assert "torch-free" in output, output[-3000:]  # the gateway never imported torch


@pytest.fixture(scope="module")
def oai(gateway):
    # No retries: a refusal must be seen as it was answered, not retried into another outcome.
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def sdk(dev_cluster):
    with Client(dev_cluster.address, timeout=120) as client:
        yield client


def _png(b64: str) -> bytes:
    return base64.b64decode(b64)


def test_generate_through_the_gateway_equals_the_grpc_sdk_byte_for_byte(oai, sdk):
    reply = oai.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 2, "seed": 5, "guidance": 3.0})
    want = sdk.generate(prompt=PROMPT, width=64, height=64, steps=2, seed=5, guidance=3.0)
    assert len(reply.data) == 1 and reply.size == "64x64" and reply.output_format == "png"
    assert _png(reply.data[0].b64_json) == want.image_data[0]
    assert reply.model_extra["fluxmesh"]["seed"] == 5 and reply.model_extra["fluxmesh"]["steps"] == 2
    # step caching rides in the same body; off is exactly today's pixels
    off = oai.images.generate(
        prompt=PROMPT, size="64x64", extra_body={"steps": 2, "seed": 5, "guidance": 3.0, "cache": "off"}
    )
    assert _png(off.data[0].b64_json) == want.image_data[0] and off.model_extra["fluxmesh"]["blocks_skipped"] == 0


def test_n_images_formats_and_urls(oai, sdk, gateway):
    want = sdk.generate(prompt=PROMPT, width=64, height=64, steps=1, seed=9, num_images=2)
    jpeg = oai.images.generate(
        prompt=PROMPT,
        size="64x64",
        n=2,
        output_format="jpeg",
        output_compression=60,
        extra_body={"steps": 1, "seed": 9},
    )
    assert len(jpeg.data) == 2
    for data, png in zip(jpeg.data, want.image_data):
        image = Image.open(io.BytesIO(_png(data.b64_json)))
        assert image.format == "JPEG" and image.size == (64, 64)
        # lossy, but the same picture
        diff = max(
            abs(a - b) for a, b in zip(image.convert("L").tobytes(), Image.open(io.BytesIO(png)).convert("L").tobytes())
        )
        assert diff < 96
    one = sdk.generate(prompt=PROMPT, width=64, height=64, steps=1, seed=9)
    webp = oai.images.generate(
        prompt=PROMPT, size="64x64", output_format="webp", output_compression=100, extra_body={"steps": 1, "seed": 9}
    )
    lossless = Image.open(io.BytesIO(_png(webp.data[0].b64_json)))
    assert lossless.format == "WEBP"
    assert lossless.convert("RGB").tobytes() == Image.open(io.BytesIO(one.image_data[0])).convert("RGB").tobytes()
    by_url = oai.images.generate(prompt=PROMPT, size="64x64", response_format="url", extra_body={"steps": 1, "seed": 9})
    url = by_url.data[0].url
    assert url.startswith(gateway.url) and by_url.data[0].b64_json is None
    fetched = httpx.get(url)
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert fetched.content == one.image_data[0]
    assert httpx.get(url.replace(url.rsplit("/", 1)[1][:6], "AAAAAA")).status_code == 404


def test_streaming_sends_partial_images_then_the_completed_image(oai, sdk):
    stream = oai.images.generate(
        prompt=PROMPT, size="64x64", stream=True, partial_images=2, extra_body={"steps": 6, "seed": 3}
    )
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 2 + ["image_generation.completed"], kinds
    assert [event.partial_image_index for event in events[:2]] == [0, 1]
    assert [event.model_extra["step"] for event in events[:2]] == [
        2,
        4,
    ]  # evenly spread over the 6 steps (the 6th is the result)
    for partial in events[:2]:
        assert Image.open(io.BytesIO(_png(partial.b64_json))).format == "PNG"
    want = sdk.generate(prompt=PROMPT, width=64, height=64, steps=6, seed=3)
    assert _png(events[-1].b64_json) == want.image_data[0]  # previews do not change the result


def test_progress_events_are_opt_in_and_count_every_step(gateway):
    body = {"prompt": PROMPT, "size": "64x64", "steps": 3, "seed": 1, "stream": True, "progress": True}
    with httpx.stream("POST", f"{gateway.url}/v1/images/generations", json=body, timeout=60) as reply:
        assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/event-stream")
        names = [line.split(": ", 1)[1] for line in reply.iter_lines() if line.startswith("event: ")]
    steps = [n for n in names if n == "fluxmesh.step"]
    assert len(steps) == 3 and names[-1] == "image_generation.completed"
    assert "fluxmesh.stage" in names and "image_generation.partial_image" not in names


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_edit_and_inpaint_through_the_gateway_equal_the_grpc_sdk(oai, sdk):
    init = _png_bytes(Image.new("RGB", (64, 64), (200, 60, 30)))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask_png = _png_bytes(mask)
    edited = oai.images.edit(
        image=("init.png", init, "image/png"), prompt=PROMPT, extra_body={"strength": 0.5, "steps": 4, "seed": 2}
    )
    want = sdk.generate(prompt=PROMPT, init_image=init, strength=0.5, steps=4, seed=2)
    assert edited.size == "64x64" and _png(edited.data[0].b64_json) == want.image_data[0]

    stream = oai.images.edit(
        image=("init.png", init, "image/png"),
        mask=("mask.png", mask_png, "image/png"),
        prompt=PROMPT,
        stream=True,
        partial_images=1,
        extra_body={"strength": 0.75, "steps": 4, "seed": 2},
    )
    events = list(stream)
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    want = sdk.generate(prompt=PROMPT, init_image=init, mask_image=mask_png, strength=0.75, steps=4, seed=2)
    assert _png(events[-1].b64_json) == want.image_data[0]


def test_models_and_loras(oai, gateway):
    models = oai.models.list().data
    assert [m.id for m in models] == ["tiny-dev"]
    card = models[0].model_extra
    assert card["kind"] == "dev" and card["guidance_embeds"] is True and card["size_multiple"] == 16
    assert oai.models.retrieve("tiny-dev").id == "tiny-dev"
    with pytest.raises(openai.NotFoundError):
        oai.models.retrieve("gpt-image-1")
    loras = httpx.get(f"{gateway.url}/v1/loras").json()
    assert loras == {"object": "list", "data": []}  # the shared cluster has no LoRA directory
    # a request may name the served model by its id
    assert (
        len(oai.images.generate(model="tiny-dev", prompt=PROMPT, size="64x64", extra_body={"steps": 1, "seed": 1}).data)
        == 1
    )


@pytest.mark.parametrize(
    "kwargs, param",
    [
        ({"size": "63x64"}, "size"),
        ({"size": "large"}, "size"),
        ({"n": 9}, "n"),
        ({"n": 0}, "n"),
        ({"extra_body": {"steps": 0}}, "steps"),
        ({"extra_body": {"seeed": 1}}, "seeed"),
        ({"output_format": "gif"}, "output_format"),
        ({"output_compression": 50}, "output_compression"),  # png is lossless
        ({"extra_body": {"loras": [{"name": "x", "weight": 9}]}}, "loras[0].weight"),
        ({"extra_body": {"cache": "sometimes"}}, "cache"),
    ],
)
def test_bad_requests_are_400_naming_the_openai_field(oai, kwargs, param):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(prompt=PROMPT, **{"size": "64x64", **kwargs})
    assert caught.value.param == param, caught.value.body
    assert caught.value.body["type"] == "invalid_request_error" and caught.value.message


def test_an_unknown_model_is_404_and_loras_without_a_lora_dir_are_400(oai):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.images.generate(model="dall-e-3", prompt=PROMPT, size="64x64")
    assert caught.value.param == "model" and caught.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as caught:
        oai.images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 1, "loras": ["style:0.5"]})
    assert "--lora-dir" in caught.value.message  # the stage's own answer, passed on


def test_a_deadline_that_passes_is_504(oai):
    with pytest.raises(openai.InternalServerError) as caught:
        oai.images.generate(prompt=PROMPT, size="256x256", extra_body={"steps": 100, "seed": 1, "timeout": 0.3})
    assert caught.value.status_code == 504 and caught.value.code == "deadline_exceeded"


def test_the_gateways_own_tokens_are_checked_before_anything_is_called():
    """With --token-file/--token-env the gateway refuses by itself (its orchestrator here does not
    even exist): a caller without an accepted token never reaches the orchestrator."""
    from fastapi.testclient import TestClient

    from fluxmesh.gateway import GatewayOptions, create_app

    app = create_app(GatewayOptions(orchestrator=f"127.0.0.1:{free_port()}", tokens=("right",)))
    body = {"prompt": PROMPT, "size": "64x64"}
    with TestClient(app) as http:
        for headers, says in (
            ({}, "missing bearer token"),
            ({"Authorization": "Bearer wrong"}, "invalid bearer token"),
            ({"Authorization": "Basic eDp5"}, "Bearer <token>"),
        ):
            reply = http.post("/v1/images/generations", json=body, headers=headers)
            assert reply.status_code == 401 and says in reply.json()["error"]["message"], reply.text
        assert http.get("/v1/loras", headers={"Authorization": "Bearer wrong"}).status_code == 401
        # the right token gets past the gateway, to an orchestrator that is not there
        reply = http.post("/v1/images/generations", json=body, headers={"Authorization": "Bearer right"})
        assert reply.status_code == 503, reply.text


def test_tokens_go_on_in_the_clear_beyond_loopback_only_with_allow_plaintext_token():
    """As the SDK and CLI do: a caller's token is not sent to a plaintext orchestrator beyond
    loopback unless the gateway was told (--allow-plaintext-token); then the call is made (to an
    address that does not answer here: TEST-NET-1)."""
    from fastapi.testclient import TestClient

    from fluxmesh.gateway import GatewayOptions, create_app

    body = {"prompt": PROMPT, "size": "64x64", "timeout": 1}
    token = {"Authorization": "Bearer tok"}
    replies = {}
    for allowed in (False, True):
        app = create_app(GatewayOptions(orchestrator="192.0.2.1:50050", allow_plaintext_token=allowed))
        with TestClient(app) as http:
            replies[allowed] = http.post("/v1/images/generations", json=body, headers=token)
    refused, sent = replies[False], replies[True]
    assert refused.status_code == 400, refused.text
    assert "refusing to send a bearer token over plaintext" in refused.json()["error"]["message"]
    assert sent.status_code in (503, 504), sent.text  # tried: refused or timed out, by the network


def test_serve_http_takes_allow_plaintext_token(monkeypatch):
    from typer.testing import CliRunner

    import fluxmesh.gateway as gateway
    from fluxmesh.cli.main import app

    served = []
    monkeypatch.setattr(gateway, "serve", lambda options, **_: served.append(options))
    argv = ["serve", "http", "--orchestrator", "10.1.2.3:50050", "--allow-plaintext-token"]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == 0, result.output
    assert served[0].allow_plaintext_token and served[0].orchestrator == "10.1.2.3:50050"


def test_the_result_store_is_bounded_and_expires():
    now = [0.0]
    store = ResultStore(max_bytes=10, ttl=5.0, clock=lambda: now[0])
    first, second = store.put(b"aaaa", "image/png"), store.put(b"bbbb", "image/png")
    third = store.put(b"cccc", "image/png")  # 12 bytes would not fit: the oldest goes
    assert store.get(first) is None and store.get(second).data == b"bbbb" and store.held_bytes == 8
    now[0] = 4.9
    assert store.get(third).data == b"cccc"
    now[0] = 5.0
    assert store.get(third) is None and len(store) == 0 and store.held_bytes == 0
    with pytest.raises(ValueError):
        store.put(b"x" * 11, "image/png")
    assert len({store.put(b"a", "image/png") for _ in range(5)}) == 5  # ids never repeat


def test_every_grpc_code_has_an_http_status_and_429_says_when_to_retry():
    assert set(HTTP_STATUS) == set(grpc.StatusCode) - {grpc.StatusCode.OK}
    status, body, headers = from_fluxmesh(FluxmeshError("queue full", code=grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert status == 429 and int(headers["Retry-After"]) > 0 and body["error"]["code"] == "resource_exhausted"
    status, body, _ = from_fluxmesh(FluxmeshError("width: 63 must be ...", code=grpc.StatusCode.INVALID_ARGUMENT))
    assert (status, body["error"]["param"]) == (400, "size")
    assert from_fluxmesh(FluxmeshError("x", code=grpc.StatusCode.UNAVAILABLE))[0] == 503
    assert from_fluxmesh(FluxmeshError("x", code=grpc.StatusCode.DEADLINE_EXCEEDED))[0] == 504


@pytest.fixture(scope="module")
def guarded(stage_addresses, stage_token, tmp_path_factory):
    """An orchestrator on the shared stages that wants a token, allows priority 1 and has no room in
    line (every admitted request is refused), and a gateway in front of it."""
    folder = tmp_path_factory.mktemp("guarded")
    flags = ("--max-priority", "1", "--max-queue", "0")
    with token_orchestrator(stage_addresses, stage_token, folder, TOKEN, *flags) as address:
        gateway = Gateway(address, log=folder / "gateway.log")
        yield gateway
        gateway.stop()


def _client(gateway: Gateway, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=token, max_retries=0, timeout=30)


def test_tokens_pass_through_to_the_orchestrator(guarded):
    with pytest.raises(openai.AuthenticationError) as caught:
        _client(guarded, "wrong").images.generate(prompt=PROMPT, size="64x64")
    assert caught.value.code == "unauthenticated"
    reply = httpx.post(f"{guarded.url}/v1/images/generations", json={"prompt": PROMPT, "size": "64x64"})
    assert reply.status_code == 401 and "bearer token" in reply.json()["error"]["message"]
    assert httpx.get(f"{guarded.url}/v1/models").status_code == 401
    assert _client(guarded, TOKEN).models.list().data[0].id == "tiny-dev"


def test_priority_above_the_callers_ceiling_is_403(guarded):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        _client(guarded, TOKEN).images.generate(prompt=PROMPT, size="64x64", extra_body={"priority": 5})
    assert caught.value.param == "priority"


def test_a_full_queue_is_429_with_retry_after(guarded):
    with pytest.raises(openai.RateLimitError) as caught:
        _client(guarded, TOKEN).images.generate(prompt=PROMPT, size="64x64", extra_body={"steps": 1})
    assert caught.value.response.headers["retry-after"].isdigit()
    assert "queue full" in caught.value.message


def test_an_orchestrator_that_is_down_is_503(tmp_path):
    gateway = Gateway(f"127.0.0.1:{free_port()}", log=tmp_path / "gateway.log")
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            _client(gateway, "any").images.generate(prompt=PROMPT, size="64x64", timeout=30)
        assert caught.value.status_code == 503 and caught.value.code == "unavailable"
    finally:
        gateway.stop()


EDGE_CASES = [
    (b'{"prompt": "a cat", ', "application/json", 400, None, "not valid JSON"),
    (b'["a cat"]', "application/json", 400, None, "JSON object"),
    (b'{"size": "64x64"}', "application/json", 400, "prompt", "required"),
    (b'{"prompt": "a cat", "colour": "red"}', "application/json", 400, "colour", "unknown field"),
    (b'{"prompt": "a cat", "steps": "many"}', "application/json", 400, "steps", "integer"),
    (b"prompt=a cat", "application/x-www-form-urlencoded", 415, None, "application/json"),
    (b"a cat", "text/plain", 415, None, "application/json"),
    (b'{"prompt": "' + b"x" * (2 * 2**20) + b'"}', "application/json", 413, None, "accepts up to"),
]


@pytest.mark.parametrize(
    "content, content_type, status, param, says",
    EDGE_CASES,
    ids=["truncated-json", "array", "no-prompt", "unknown-field", "wrong-type", "form", "text", "oversized"],
)
def test_raw_http_edge_cases_are_clear_errors(gateway, content, content_type, status, param, says):
    reply = httpx.post(
        f"{gateway.url}/v1/images/generations", content=content, headers={"content-type": content_type}, timeout=30
    )
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert error["param"] == param and says in error["message"], error
    assert httpx.get(f"{gateway.url}/health").status_code == 200  # and it keeps serving


def test_wrong_methods_paths_and_edit_bodies(gateway):
    assert httpx.get(f"{gateway.url}/v1/images/generations").status_code == 405
    missing = httpx.get(f"{gateway.url}/v1/nothing")
    assert missing.status_code == 404 and "no such endpoint" in missing.json()["error"]["message"]
    as_json = httpx.post(f"{gateway.url}/v1/images/edits", json={"prompt": PROMPT})
    assert as_json.status_code == 415 and "multipart/form-data" in as_json.json()["error"]["message"]
    no_image = httpx.post(
        f"{gateway.url}/v1/images/edits", data={"prompt": PROMPT}, files={"mask": ("m.png", b"x", "image/png")}
    )
    assert no_image.status_code == 400 and no_image.json()["error"]["param"] == "image"
    not_an_image = httpx.post(
        f"{gateway.url}/v1/images/edits", data={"prompt": PROMPT}, files={"image": ("i.png", b"not a png", "image/png")}
    )
    assert not_an_image.status_code == 400 and not_an_image.json()["error"]["param"] == "image"
    assert (
        httpx.post(
            f"{gateway.url}/v1/images/generations", headers={"Authorization": "Basic eDp5"}, json={"prompt": PROMPT}
        ).status_code
        == 401
    )


def _steps_run(sdk: Client) -> int:
    return next(int(s.details["steps_run"]) for s in sdk.info().stages if s.stage == "denoiser")


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_disconnects_cancels_the_generation(gateway, sdk, stream):
    body = {"prompt": PROMPT, "size": "1024x1024", "steps": 100, "seed": 1, "stream": stream, "progress": stream}
    before = _steps_run(sdk)
    with httpx.Client(timeout=httpx.Timeout(60, read=None if stream else 2.0)) as http:
        if stream:
            with http.stream("POST", f"{gateway.url}/v1/images/generations", json=body) as reply:
                for line in reply.iter_lines():
                    if line.startswith("event: fluxmesh.step"):
                        break  # leaving the block closes the connection
        else:
            with pytest.raises(httpx.ReadTimeout):  # gives up on the answer: the connection closes
                http.post(f"{gateway.url}/v1/images/generations", json=body)
    # the denoiser stops within a step once the gateway cancels: far fewer than 100 steps run
    ran = wait_settled(lambda: _steps_run(sdk), what="the denoiser after the client left") - before
    assert ran < 100
    assert sdk.generate(prompt=PROMPT, width=64, height=64, steps=1, seed=2).image.size == (64, 64)


def test_openapi_documents_what_is_served(gateway):
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    assert set(spec["paths"]) == {
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/images/results/{name}",
        "/v1/models",
        "/v1/models/{model_id}",
        "/v1/loras",
        "/health",
    }
    for path, operations in spec["paths"].items():
        for method in operations:
            reply = httpx.request(method.upper(), gateway.url + path.replace("{name}", "x").replace("{model_id}", "x"))
            assert "no such endpoint" not in reply.text and reply.status_code != 405, (method, path)
    generation = spec["components"]["schemas"]["ImageGenerationRequest"]
    assert generation["additionalProperties"] is False
    assert {
        "prompt",
        "n",
        "size",
        "response_format",
        "output_format",
        "stream",
        "partial_images",
        "seed",
        "steps",
        "guidance",
        "negative_prompt",
        "true_cfg_scale",
        "loras",
        "priority",
        "cache",
    } <= set(generation["properties"])
    edits = spec["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
    assert list(edits) == ["multipart/form-data"]
    schema = spec["components"]["schemas"][edits["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]]
    assert {"image", "mask", "strength", "prompt"} <= set(schema["properties"])
    responses = spec["paths"]["/v1/images/generations"]["post"]["responses"]
    assert {"application/json", "text/event-stream"} <= set(responses["200"]["content"])
    assert {"400", "401", "429", "503", "504"} <= set(responses)


def test_the_page_and_its_files_come_from_the_gateway(gateway):
    page = httpx.get(gateway.url + "/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'none'" in page.headers["content-security-policy"]
    for name in ("page.js", "page.css"):
        assert name in page.text and httpx.get(f"{gateway.url}/page/{name}").status_code == 200
    for text in (page.text, httpx.get(f"{gateway.url}/page/page.js").text):
        assert "http://" not in text and "https://" not in text  # nothing fetched from elsewhere


def test_cors_is_off_unless_configured(gateway, dev_cluster, tmp_path):
    preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
    reply = httpx.options(f"{gateway.url}/v1/images/generations", headers=preflight)
    assert "access-control-allow-origin" not in reply.headers
    allowed = Gateway(dev_cluster.address, "--cors-origin", "https://elsewhere.example", log=tmp_path / "g.log")
    try:
        reply = httpx.options(f"{allowed.url}/v1/images/generations", headers=preflight)
        assert reply.headers["access-control-allow-origin"] == "https://elsewhere.example"
    finally:
        allowed.stop()


def test_https_with_the_same_tls_flags_as_the_grpc_ports(dev_cluster, tmp_path):
    from certs import Authority

    authority = Authority(tmp_path, "http")
    server = authority.issue("server", server=True)
    trust = ssl.create_default_context(cafile=str(authority.pem))
    gateway = Gateway(
        dev_cluster.address,
        "--tls-cert",
        str(server.cert),
        "--tls-key",
        str(server.key),
        log=tmp_path / "g.log",
        scheme="https",
        verify=trust,
    )
    try:
        reply = httpx.post(
            f"{gateway.url}/v1/images/generations",
            verify=trust,
            timeout=60,
            json={"prompt": PROMPT, "size": "64x64", "steps": 1, "seed": 1},
        )
        assert reply.status_code == 200 and reply.json()["data"][0]["b64_json"]
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{gateway.url}/health")  # not trusted without the CA
    finally:
        gateway.stop()


def test_demo_serve_prints_the_page_address_and_serves_it(tmp_path):
    """`fluxmesh demo --serve` (the same start-up `up --http-port` uses): the page's address is
    printed, the page and the API answer there, and SIGTERM stops every process."""
    port = free_port()
    log = tmp_path / "demo.log"
    with open(log, "wb") as output:  # a file, not a pipe: five processes write to it
        demo = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fluxmesh.cli",
                "demo",
                "--serve",
                "--http-port",
                str(port),
                "-o",
                str(tmp_path / "demo.png"),
                "--width",
                "64",
                "--height",
                "64",
                "--steps",
                "2",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=child_environment(),
        )
    try:
        page = f"http://127.0.0.1:{port}/"
        output = functools.partial(log.read_text, errors="replace")
        wait_until(
            lambda: f"the page is on {page}" in output(), 240, what="the page's address", alive=exited(demo, output)
        )
        assert (tmp_path / "demo.png").stat().st_size > 0
        assert "fluxmesh" in httpx.get(page).text
        reply = httpx.post(
            page + "v1/images/generations", json={"prompt": PROMPT, "size": "64x64", "steps": 1}, timeout=60
        )
        assert reply.status_code == 200 and reply.json()["data"][0]["b64_json"]
    finally:
        demo.terminate()
        assert demo.wait(timeout=60) == 0
