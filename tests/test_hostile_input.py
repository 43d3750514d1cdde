"""Hostile input: a table of malformed requests across every RPC, then a property-based fuzz.

Every case gets its precise status (and, for INVALID_ARGUMENT, a message naming the field), no
process dies, and a valid request to the same service succeeds right after. The module runs its
own four processes: stages with a LoRA directory (so unknown and escaping LoRA names can be
tried) and an orchestrator with a 1 MiB request limit (so "oversized" is cheap to send).
Runtime: about 40 s on two cores (most of it the process start and the fuzz).
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from conftest import stage_metadata
from fluxmesh.v1 import common_pb2, denoiser_pb2, encoder_pb2, generator_pb2, vae_pb2
from mesh import Mesh
from rpc_tools import Caller

C = grpc.StatusCode
GENERATE = "/fluxmesh.v1.Generator/Generate"
ENCODE = "/fluxmesh.v1.TextEncoder/Encode"
DENOISE = "/fluxmesh.v1.Denoiser/Denoise"
DECODE = "/fluxmesh.v1.Vae/Decode"
ENCODE_IMAGE = "/fluxmesh.v1.Vae/Encode"
RESIDENCY = {stage: "/fluxmesh.v1.Residency/Status" for stage in ("encoder", "denoiser", "vae")}
INFO = {
    "orchestrator": "/fluxmesh.v1.Generator/Info",
    "encoder": "/fluxmesh.v1.TextEncoder/Info",
    "denoiser": "/fluxmesh.v1.Denoiser/Info",
    "vae": "/fluxmesh.v1.Vae/Info",
}
SERVICE_OF = {
    GENERATE: "orchestrator",
    ENCODE: "encoder",
    DENOISE: "denoiser",
    DECODE: "vae",
    ENCODE_IMAGE: "vae",
    "/fluxmesh.v1.Residency/Status": "vae",
    "/fluxmesh.v1.Residency/Release": "vae",
    "/fluxmesh.v1.Generator/ListLoras": "orchestrator",
    "/fluxmesh.v1.Denoiser/ListLoras": "denoiser",
    **{method: name for name, method in INFO.items()},
}
CORRUPT = b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"  # a length-delimited field of absurd length
PROMPT = "a photo of a cat sitting on a windowsill"


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, dev_model) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from lora_fixtures import write_lora

    directory = tmp_path_factory.mktemp("loras")
    (directory / "broken.safetensors").write_bytes(b"\x80\x04 not a safetensors file")
    write_lora("kohya", directory / "good.safetensors", dev_model, seed=1)
    tensors = load_file(str(directory / "good.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in tensors.items()}, str(directory / "float8.safetensors"))
    # Entries no request can use: ListLoras skips them (and logs them) instead of failing.
    (directory / "dangling.safetensors").symlink_to(directory / "gone.safetensors")
    (directory / "loop.safetensors").symlink_to(directory / "loop.safetensors")
    (directory / "back\\slash.safetensors").write_bytes((directory / "good.safetensors").read_bytes())
    return directory


@pytest.fixture(scope="module")
def cluster(dev_model, lora_dir):
    lora = ["--lora-dir", str(lora_dir)]
    args = {"encoder": lora, "denoiser": lora, "orchestrator": ["--max-request-mib", "1"]}
    with Mesh(dev_model, extra_args=args).start_all() as running:
        yield running


@pytest.fixture(scope="module")
def addresses(cluster) -> dict[str, str]:
    return {child.name: child.address for child in cluster.children}


@pytest.fixture(scope="module")
def rpc(cluster):
    caller = Caller(metadata=stage_metadata(cluster.stage_token))  # the stages demand it; the orchestrator ignores it
    yield caller
    caller.close()


def _tensor(array: np.ndarray, dtype: str = "float32", shape: list[int] | None = None) -> common_pb2.Tensor:
    return common_pb2.Tensor(
        dtype=dtype,
        shape=list(array.shape) if shape is None else shape,
        data=np.ascontiguousarray(array, dtype=np.float32).tobytes(),
    )


@dataclass(frozen=True)
class Valid:
    """Well-formed requests for each RPC, built from what the tiny model's stages really produce."""

    generate: generator_pb2.GenerateRequest
    encode: encoder_pb2.EncodeRequest
    denoise: denoiser_pb2.DenoiseRequest
    decode: vae_pb2.DecodeRequest
    embeds: np.ndarray  # (1, L, D)
    pooled: np.ndarray  # (1, D_pooled)
    latents: np.ndarray  # (1, seq, 4C) for 64x64

    def with_tensors(self, **changes) -> denoiser_pb2.DenoiseRequest:
        request = denoiser_pb2.DenoiseRequest()
        request.CopyFrom(self.denoise)
        for field, value in changes.items():
            if isinstance(value, common_pb2.Tensor):
                getattr(request, field).CopyFrom(value)
            elif isinstance(value, list):
                del getattr(request, field)[:]
                getattr(request, field).extend(value)
            else:
                setattr(request, field, value)
        return request

    def with_decode(self, **changes) -> vae_pb2.DecodeRequest:
        request = vae_pb2.DecodeRequest()
        request.CopyFrom(self.decode)
        for field, value in changes.items():
            if isinstance(value, common_pb2.Tensor):
                request.latents.CopyFrom(value)
            else:
                setattr(request, field, value)
        return request

    def generating(self, **changes) -> generator_pb2.GenerateRequest:
        request = generator_pb2.GenerateRequest()
        request.CopyFrom(self.generate)
        for field, value in changes.items():
            if field == "loras":
                request.loras.extend(value)
            elif field == "preview":
                request.preview.CopyFrom(value)
            else:
                setattr(request, field, value)
        return request

    def encoding(self, **changes) -> encoder_pb2.EncodeRequest:
        request = encoder_pb2.EncodeRequest()
        request.CopyFrom(self.encode)
        for field, value in changes.items():
            if isinstance(value, list):
                del getattr(request, field)[:]
                getattr(request, field).extend(value)
            else:
                setattr(request, field, value)
        return request


@pytest.fixture(scope="module")
def valid(addresses, rpc) -> Valid:
    encode = encoder_pb2.EncodeRequest(prompts=[PROMPT], max_sequence_length=16)
    code, _, [raw] = rpc(addresses["encoder"], ENCODE, encode)
    assert code == C.OK
    embeddings = encoder_pb2.EncodeResponse.FromString(raw)
    denoise = denoiser_pb2.DenoiseRequest(
        prompt_embeds=embeddings.prompt_embeds,
        pooled_prompt_embeds=embeddings.pooled_prompt_embeds,
        width=64,
        height=64,
        steps=1,
        guidance=3.5,
        seed=1,
        num_images=1,
    )
    code, _, events = rpc(addresses["denoiser"], DENOISE, denoise)
    assert code == C.OK
    latents = denoiser_pb2.DenoiseEvent.FromString(events[-1]).latents

    def array(t: common_pb2.Tensor) -> np.ndarray:
        return np.frombuffer(t.data, dtype=np.float32).reshape(list(t.shape))

    return Valid(
        generate=generator_pb2.GenerateRequest(prompt=PROMPT, width=64, height=64, steps=1, seed=1),
        encode=encode,
        denoise=denoise,
        decode=vae_pb2.DecodeRequest(latents=latents, width=64, height=64, format=common_pb2.IMAGE_FORMAT_PNG),
        embeds=array(embeddings.prompt_embeds),
        pooled=array(embeddings.pooled_prompt_embeds),
        latents=array(latents),
    )


def _with(array: np.ndarray, index, value) -> np.ndarray:
    copy = np.array(array, dtype=np.float32)
    copy[index] = value
    return copy


def _lora(name: str, weight: float = 1.0) -> common_pb2.LoraWeight:
    return common_pb2.LoraWeight(name=name, weight=weight)


def _png(width: int = 64, height: int = 64, mode: str = "RGB", fmt: str = "PNG", color=(200, 30, 30)) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (width, height), color if mode == "RGB" else 255).save(buffer, format=fmt)
    return buffer.getvalue()


def _one_row_png(width: int = 64, height: int = 64) -> bytes:
    """A well-formed PNG whose pixel data ends after its first row (Pillow fills the rest black)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    row = b"\x00" + bytes([200, 30, 30]) * width
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(row)) + chunk(b"IEND", b"")


def _image_request(**changes) -> vae_pb2.EncodeImageRequest:
    return vae_pb2.EncodeImageRequest(**{"image": _png(), "width": 64, "height": 64, **changes})


def _invalid_utf8_prompt() -> bytes:
    # field 1 (prompt), length 3, bytes that are not UTF-8; then width/height 64, steps 1
    return b"\x0a\x03\xff\xfe\xfd" + b"\x18\x40\x20\x40\x28\x01"


Build = Callable[[Valid], object]
# (case id, method, request builder, expected status, what the message starts with / contains)
CASES: list[tuple[str, str, Build, grpc.StatusCode, str]] = [
    # --- Generator.Generate: the public API -------------------------------------------------
    ("gen-empty-prompt", GENERATE, lambda v: v.generating(prompt=""), C.INVALID_ARGUMENT, "prompt:"),
    ("gen-blank-prompt", GENERATE, lambda v: v.generating(prompt=" \t\n "), C.INVALID_ARGUMENT, "prompt:"),
    ("gen-huge-prompt", GENERATE, lambda v: v.generating(prompt="x" * 20_001), C.INVALID_ARGUMENT, "prompt:"),
    ("gen-huge-prompt-2", GENERATE, lambda v: v.generating(prompt_2="y" * 20_001), C.INVALID_ARGUMENT, "prompt_2:"),
    ("gen-width-not-multiple", GENERATE, lambda v: v.generating(width=100), C.INVALID_ARGUMENT, "width:"),
    ("gen-width-small", GENERATE, lambda v: v.generating(width=32), C.INVALID_ARGUMENT, "width:"),
    ("gen-width-negative", GENERATE, lambda v: v.generating(width=-64), C.INVALID_ARGUMENT, "width:"),
    ("gen-width-huge", GENERATE, lambda v: v.generating(width=1 << 30), C.INVALID_ARGUMENT, "width:"),
    ("gen-height-not-multiple", GENERATE, lambda v: v.generating(height=72), C.INVALID_ARGUMENT, "height:"),
    ("gen-height-max-int", GENERATE, lambda v: v.generating(height=2**31 - 1), C.INVALID_ARGUMENT, "height:"),
    ("gen-steps-zero", GENERATE, lambda v: v.generating(steps=0), C.INVALID_ARGUMENT, "steps:"),
    ("gen-steps-many", GENERATE, lambda v: v.generating(steps=101), C.INVALID_ARGUMENT, "steps:"),
    ("gen-steps-negative", GENERATE, lambda v: v.generating(steps=-5), C.INVALID_ARGUMENT, "steps:"),
    ("gen-guidance-nan", GENERATE, lambda v: v.generating(guidance=math.nan), C.INVALID_ARGUMENT, "guidance:"),
    ("gen-guidance-inf", GENERATE, lambda v: v.generating(guidance=math.inf), C.INVALID_ARGUMENT, "guidance:"),
    ("gen-guidance-neg-inf", GENERATE, lambda v: v.generating(guidance=-math.inf), C.INVALID_ARGUMENT, "guidance:"),
    ("gen-images-many", GENERATE, lambda v: v.generating(num_images=9), C.INVALID_ARGUMENT, "num_images:"),
    (
        "gen-negative-without-scale",
        GENERATE,
        lambda v: v.generating(negative_prompt="blurry"),
        C.INVALID_ARGUMENT,
        "true_cfg_scale:",
    ),
    (
        "gen-scale-without-negative",
        GENERATE,
        lambda v: v.generating(true_cfg_scale=4.0),
        C.INVALID_ARGUMENT,
        "negative_prompt:",
    ),
    (
        "gen-true-cfg-nan",
        GENERATE,
        lambda v: v.generating(negative_prompt="", true_cfg_scale=math.nan),
        C.INVALID_ARGUMENT,
        "true_cfg_scale:",
    ),
    (
        "gen-true-cfg-huge",
        GENERATE,
        lambda v: v.generating(negative_prompt="", true_cfg_scale=31.0),
        C.INVALID_ARGUMENT,
        "true_cfg_scale:",
    ),
    (
        "gen-true-cfg-below-one",
        GENERATE,
        lambda v: v.generating(negative_prompt="", true_cfg_scale=0.5),
        C.INVALID_ARGUMENT,
        "true_cfg_scale:",
    ),
    (
        "gen-negative-2-alone",
        GENERATE,
        lambda v: v.generating(negative_prompt_2="blurry"),
        C.INVALID_ARGUMENT,
        "negative_prompt_2:",
    ),
    (
        "gen-huge-negative",
        GENERATE,
        lambda v: v.generating(negative_prompt="x" * 20_001, true_cfg_scale=2.0),
        C.INVALID_ARGUMENT,
        "negative_prompt:",
    ),
    ("gen-images-negative", GENERATE, lambda v: v.generating(num_images=-1), C.INVALID_ARGUMENT, "num_images:"),
    (
        "gen-seq-long",
        GENERATE,
        lambda v: v.generating(max_sequence_length=513),
        C.INVALID_ARGUMENT,
        "max_sequence_length:",
    ),
    (
        "gen-seq-negative",
        GENERATE,
        lambda v: v.generating(max_sequence_length=-1),
        C.INVALID_ARGUMENT,
        "max_sequence_length:",
    ),
    (
        "gen-unknown-preview-kind",
        GENERATE,
        lambda v: v.generating(preview=generator_pb2.Preview(kind=9)),
        C.INVALID_ARGUMENT,
        "preview.kind:",
    ),
    ("gen-lora-unknown", GENERATE, lambda v: v.generating(loras=[_lora("no-such-lora")]), C.NOT_FOUND, "no-such-lora"),
    (
        "gen-lora-escapes",
        GENERATE,
        lambda v: v.generating(loras=[_lora("../../etc/passwd")]),
        C.INVALID_ARGUMENT,
        "../../etc/passwd",
    ),
    (
        "gen-lora-absolute",
        GENERATE,
        lambda v: v.generating(loras=[_lora("/etc/passwd")]),
        C.INVALID_ARGUMENT,
        "/etc/passwd",
    ),
    (
        "gen-lora-not-safetensors",
        GENERATE,
        lambda v: v.generating(loras=[_lora("broken")]),
        C.INVALID_ARGUMENT,
        "broken",
    ),
    (
        "gen-lora-float8",
        GENERATE,
        lambda v: v.generating(loras=[_lora("float8")]),
        C.INVALID_ARGUMENT,
        "(float8.safetensors): tensor",
    ),
    (
        "gen-lora-loop",
        GENERATE,
        lambda v: v.generating(loras=[_lora("loop")]),
        C.INVALID_ARGUMENT,
        "'loop' is a symlink loop",
    ),
    (
        "gen-lora-weight-nan",
        GENERATE,
        lambda v: v.generating(loras=[_lora("x", math.nan)]),
        C.INVALID_ARGUMENT,
        "loras[0].weight:",
    ),
    (
        "gen-lora-weight-big",
        GENERATE,
        lambda v: v.generating(loras=[_lora("x", 5.0)]),
        C.INVALID_ARGUMENT,
        "loras[0].weight:",
    ),
    ("gen-lora-empty-name", GENERATE, lambda v: v.generating(loras=[_lora("")]), C.INVALID_ARGUMENT, "loras[0].name:"),
    (
        "gen-lora-twice",
        GENERATE,
        lambda v: v.generating(loras=[_lora("a"), _lora("a")]),
        C.INVALID_ARGUMENT,
        "loras[1].name:",
    ),
    (
        "gen-preview-every-negative",
        GENERATE,
        lambda v: v.generating(preview=generator_pb2.Preview(kind=1, every=-2)),
        C.INVALID_ARGUMENT,
        "preview.every:",
    ),
    (
        "gen-init-image-garbage",
        GENERATE,
        lambda v: v.generating(init_image=b"\x89PNG\r\n\x1a\n garbage"),
        C.INVALID_ARGUMENT,
        "init_image:",
    ),
    (
        "gen-init-image-one-row",
        GENERATE,
        lambda v: v.generating(init_image=_one_row_png()),
        C.INVALID_ARGUMENT,
        "init_image: truncated PNG",
    ),
    (
        "gen-mask-one-row",
        GENERATE,
        lambda v: v.generating(init_image=_png(), mask_image=_one_row_png()),
        C.INVALID_ARGUMENT,
        "mask_image: truncated PNG",
    ),
    (
        "gen-init-image-gif",
        GENERATE,
        lambda v: v.generating(init_image=_png(fmt="GIF")),
        C.INVALID_ARGUMENT,
        "init_image:",
    ),
    (
        "gen-init-image-huge-header",
        GENERATE,
        lambda v: v.generating(init_image=_png(8192, 16, "L")),
        C.INVALID_ARGUMENT,
        "init_image:",
    ),
    (
        "gen-mask-without-init",
        GENERATE,
        lambda v: v.generating(mask_image=_png(mode="L")),
        C.INVALID_ARGUMENT,
        "mask_image:",
    ),
    (
        "gen-mask-wrong-size",
        GENERATE,
        lambda v: v.generating(init_image=_png(), mask_image=_png(32, 32, "L")),
        C.INVALID_ARGUMENT,
        "mask_image:",
    ),
    ("gen-strength-without-init", GENERATE, lambda v: v.generating(strength=0.5), C.INVALID_ARGUMENT, "strength:"),
    (
        "gen-strength-zero",
        GENERATE,
        lambda v: v.generating(init_image=_png(), strength=0.0),
        C.INVALID_ARGUMENT,
        "strength:",
    ),
    (
        "gen-strength-nan",
        GENERATE,
        lambda v: v.generating(init_image=_png(), strength=math.nan),
        C.INVALID_ARGUMENT,
        "strength:",
    ),
    ("gen-corrupt-bytes", GENERATE, lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("gen-invalid-utf8", GENERATE, lambda v: _invalid_utf8_prompt(), C.INVALID_ARGUMENT, "request:"),
    ("gen-oversized", GENERATE, lambda v: v.generating(prompt_2="z" * (2 << 20)), C.RESOURCE_EXHAUSTED, ""),
    ("gen-info-corrupt", INFO["orchestrator"], lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("gen-listloras-corrupt", "/fluxmesh.v1.Generator/ListLoras", lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("gen-unknown-method", "/fluxmesh.v1.Generator/Explode", lambda v: b"", C.UNIMPLEMENTED, ""),
    # --- TextEncoder.Encode ---------------------------------------------------------------
    ("enc-no-prompts", ENCODE, lambda v: v.encoding(prompts=[]), C.INVALID_ARGUMENT, "prompts:"),
    ("enc-too-many-prompts", ENCODE, lambda v: v.encoding(prompts=["a"] * 9), C.INVALID_ARGUMENT, "prompts:"),
    ("enc-prompts-2-mismatch", ENCODE, lambda v: v.encoding(prompts_2=["a", "b"]), C.INVALID_ARGUMENT, "prompts_2:"),
    ("enc-huge-prompt", ENCODE, lambda v: v.encoding(prompts=["x" * 20_001]), C.INVALID_ARGUMENT, "prompts[0]:"),
    ("enc-huge-prompt-2", ENCODE, lambda v: v.encoding(prompts_2=["y" * 20_001]), C.INVALID_ARGUMENT, "prompts_2[0]:"),
    ("enc-seq-long", ENCODE, lambda v: v.encoding(max_sequence_length=513), C.INVALID_ARGUMENT, "max_sequence_length:"),
    (
        "enc-seq-negative",
        ENCODE,
        lambda v: v.encoding(max_sequence_length=-3),
        C.INVALID_ARGUMENT,
        "max_sequence_length:",
    ),
    ("enc-lora-unknown", ENCODE, lambda v: v.encoding(loras=[_lora("missing")]), C.NOT_FOUND, "loras[0]"),
    ("enc-lora-escapes", ENCODE, lambda v: v.encoding(loras=[_lora("../x")]), C.INVALID_ARGUMENT, "loras[0]"),
    ("enc-corrupt-bytes", ENCODE, lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("enc-info-corrupt", INFO["encoder"], lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    # --- Denoiser.Denoise -----------------------------------------------------------------
    (
        "den-dtype-unknown",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds, "complex64")),
        C.INVALID_ARGUMENT,
        "prompt_embeds.dtype:",
    ),
    (
        "den-dtype-empty",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds, "")),
        C.INVALID_ARGUMENT,
        "prompt_embeds.dtype:",
    ),
    (
        "den-embeds-missing",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=common_pb2.Tensor()),
        C.INVALID_ARGUMENT,
        "prompt_embeds.dtype:",
    ),
    (
        "den-dtype-uint8",
        DENOISE,
        lambda v: v.with_tensors(
            prompt_embeds=common_pb2.Tensor(dtype="uint8", shape=list(v.embeds.shape), data=bytes(v.embeds.size))
        ),
        C.INVALID_ARGUMENT,
        "prompt_embeds.dtype:",
    ),
    (
        "den-shape-negative",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds, shape=[1, -16, 32])),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    (
        "den-shape-2d",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds[0])),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    (
        "den-bytes-short",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds, shape=[1, 17, 32])),
        C.INVALID_ARGUMENT,
        "prompt_embeds.data:",
    ),
    (
        "den-absurd-size",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(v.embeds, shape=[1 << 20, 1 << 20, 32])),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    (
        "den-empty-tensor",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=common_pb2.Tensor(dtype="float32", shape=[1, 0, 32])),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    (
        "den-nan-embeds",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(_with(v.embeds, (0, 3, 5), np.nan))),
        C.INVALID_ARGUMENT,
        "prompt_embeds.data:",
    ),
    (
        "den-inf-embeds",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(_with(v.embeds, (0, 0, 0), np.inf))),
        C.INVALID_ARGUMENT,
        "prompt_embeds.data:",
    ),
    (
        "den-nan-pooled",
        DENOISE,
        lambda v: v.with_tensors(pooled_prompt_embeds=_tensor(_with(v.pooled, (0, 1), np.nan))),
        C.INVALID_ARGUMENT,
        "pooled_prompt_embeds.data:",
    ),
    (
        "den-embed-dim",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(np.zeros((1, 16, 31)))),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    (
        "den-pooled-dim",
        DENOISE,
        lambda v: v.with_tensors(pooled_prompt_embeds=_tensor(np.zeros((1, 33)))),
        C.INVALID_ARGUMENT,
        "pooled_prompt_embeds.shape:",
    ),
    (
        "den-batch-mismatch",
        DENOISE,
        lambda v: v.with_tensors(pooled_prompt_embeds=_tensor(np.zeros((2, 32)))),
        C.INVALID_ARGUMENT,
        "pooled_prompt_embeds.shape:",
    ),
    (
        "den-seq-too-long",
        DENOISE,
        lambda v: v.with_tensors(prompt_embeds=_tensor(np.zeros((1, 2000, 32)))),
        C.INVALID_ARGUMENT,
        "prompt_embeds.shape:",
    ),
    ("den-width-zero", DENOISE, lambda v: v.with_tensors(width=0), C.INVALID_ARGUMENT, "width:"),
    ("den-width-not-multiple", DENOISE, lambda v: v.with_tensors(width=72), C.INVALID_ARGUMENT, "width:"),
    ("den-height-huge", DENOISE, lambda v: v.with_tensors(height=1 << 20), C.INVALID_ARGUMENT, "height:"),
    ("den-steps-zero", DENOISE, lambda v: v.with_tensors(steps=0), C.INVALID_ARGUMENT, "steps:"),
    ("den-steps-many", DENOISE, lambda v: v.with_tensors(steps=10_000), C.INVALID_ARGUMENT, "steps:"),
    ("den-images-many", DENOISE, lambda v: v.with_tensors(num_images=9), C.INVALID_ARGUMENT, "num_images:"),
    (
        "den-batch-times-images",
        DENOISE,
        lambda v: v.with_tensors(
            prompt_embeds=_tensor(np.zeros((2, 16, 32))), pooled_prompt_embeds=_tensor(np.zeros((2, 32))), num_images=5
        ),
        C.INVALID_ARGUMENT,
        "num_images:",
    ),
    ("den-guidance-huge", DENOISE, lambda v: v.with_tensors(guidance=1e38), C.INVALID_ARGUMENT, "guidance:"),
    ("gen-guidance-huge", GENERATE, lambda v: v.generating(guidance=1e38), C.INVALID_ARGUMENT, "guidance:"),
    (
        "gen-loras-too-many",
        GENERATE,
        lambda v: v.generating(loras=[_lora(f"l{i}") for i in range(9)]),
        C.INVALID_ARGUMENT,
        "loras: 9 LoRAs; the limit is 8",
    ),
    ("den-guidance-nan", DENOISE, lambda v: v.with_tensors(guidance=math.nan), C.INVALID_ARGUMENT, "guidance:"),
    (
        "den-negative-shape",
        DENOISE,
        lambda v: v.with_tensors(
            negative_prompt_embeds=_tensor(np.zeros((1, 8, 32))),
            negative_pooled_prompt_embeds=_tensor(v.pooled),
            true_cfg_scale=4.0,
        ),
        C.INVALID_ARGUMENT,
        "negative_prompt_embeds.shape:",
    ),
    (
        "den-negative-half",
        DENOISE,
        lambda v: v.with_tensors(negative_prompt_embeds=_tensor(v.embeds), true_cfg_scale=4.0),
        C.INVALID_ARGUMENT,
        "negative_pooled_prompt_embeds:",
    ),
    (
        "den-negative-without-scale",
        DENOISE,
        lambda v: v.with_tensors(
            negative_prompt_embeds=_tensor(v.embeds), negative_pooled_prompt_embeds=_tensor(v.pooled)
        ),
        C.INVALID_ARGUMENT,
        "true_cfg_scale:",
    ),
    (
        "den-negative-nan",
        DENOISE,
        lambda v: v.with_tensors(
            negative_prompt_embeds=_tensor(_with(v.embeds, (0, 1, 1), np.nan)),
            negative_pooled_prompt_embeds=_tensor(v.pooled),
            true_cfg_scale=4.0,
        ),
        C.INVALID_ARGUMENT,
        "negative_prompt_embeds.data:",
    ),
    ("den-lora-unknown", DENOISE, lambda v: v.with_tensors(loras=[_lora("missing")]), C.NOT_FOUND, "loras[0]"),
    (
        "den-lora-float8",
        DENOISE,
        lambda v: v.with_tensors(loras=[_lora("float8")]),
        C.INVALID_ARGUMENT,
        "is float8_e4m3fn",
    ),
    (
        "den-lora-escapes",
        DENOISE,
        lambda v: v.with_tensors(loras=[_lora("sub/../../x")]),
        C.INVALID_ARGUMENT,
        "loras[0]",
    ),
    ("den-corrupt-bytes", DENOISE, lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("den-info-corrupt", INFO["denoiser"], lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("den-listloras-corrupt", "/fluxmesh.v1.Denoiser/ListLoras", lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    # --- Vae.Decode -------------------------------------------------------------------------
    (
        "vae-bytes-short",
        DECODE,
        lambda v: v.with_decode(latents=common_pb2.Tensor(dtype="float32", shape=[1, 16, 64], data=b"\0" * 10)),
        C.INVALID_ARGUMENT,
        "latents.data:",
    ),
    (
        "vae-dtype-unknown",
        DECODE,
        lambda v: v.with_decode(latents=_tensor(v.latents, "float64")),
        C.INVALID_ARGUMENT,
        "latents.dtype:",
    ),
    (
        "vae-dtype-uint8",
        DECODE,
        lambda v: v.with_decode(
            latents=common_pb2.Tensor(dtype="uint8", shape=list(v.latents.shape), data=bytes(v.latents.size))
        ),
        C.INVALID_ARGUMENT,
        "latents.dtype:",
    ),
    (
        "vae-nan",
        DECODE,
        lambda v: v.with_decode(latents=_tensor(_with(v.latents, (0, 2, 3), np.nan))),
        C.INVALID_ARGUMENT,
        "latents.data:",
    ),
    ("vae-width-zero", DECODE, lambda v: v.with_decode(width=0), C.INVALID_ARGUMENT, "width:"),
    ("vae-width-not-multiple", DECODE, lambda v: v.with_decode(width=70), C.INVALID_ARGUMENT, "width:"),
    ("vae-width-huge", DECODE, lambda v: v.with_decode(width=1 << 16), C.INVALID_ARGUMENT, "width:"),
    ("vae-shape-vs-size", DECODE, lambda v: v.with_decode(width=128), C.INVALID_ARGUMENT, "latents.shape:"),
    (
        "vae-batch-many",
        DECODE,
        lambda v: v.with_decode(latents=_tensor(np.zeros((9, 16, 64)))),
        C.INVALID_ARGUMENT,
        "latents.shape:",
    ),
    ("vae-unknown-format", DECODE, lambda v: v.with_decode(format=99), C.INVALID_ARGUMENT, "format:"),
    ("vae-corrupt-bytes", DECODE, lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("vae-info-corrupt", INFO["vae"], lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    # --- Vae.Encode (init images) -------------------------------------------------------------
    ("vae-encode-empty-image", ENCODE_IMAGE, lambda v: _image_request(image=b""), C.INVALID_ARGUMENT, "image:"),
    (
        "vae-encode-garbage",
        ENCODE_IMAGE,
        lambda v: _image_request(image=b"GIF89a nonsense"),
        C.INVALID_ARGUMENT,
        "image:",
    ),
    ("vae-encode-width-zero", ENCODE_IMAGE, lambda v: _image_request(width=0), C.INVALID_ARGUMENT, "width:"),
    ("vae-encode-width-huge", ENCODE_IMAGE, lambda v: _image_request(width=1 << 20), C.INVALID_ARGUMENT, "width:"),
    (
        "vae-encode-mask-size",
        ENCODE_IMAGE,
        lambda v: _image_request(mask=_png(16, 16, "L")),
        C.INVALID_ARGUMENT,
        "mask:",
    ),
    (
        "vae-encode-one-row",
        ENCODE_IMAGE,
        lambda v: _image_request(image=_one_row_png()),
        C.INVALID_ARGUMENT,
        "image: truncated PNG",
    ),
    ("vae-encode-mask-colour", ENCODE_IMAGE, lambda v: _image_request(mask=_png()), C.INVALID_ARGUMENT, "mask:"),
    ("vae-encode-corrupt", ENCODE_IMAGE, lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    # --- Residency (every stage) ----------------------------------------------------------------
    ("residency-status-corrupt", RESIDENCY["vae"], lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
    ("residency-release-corrupt", "/fluxmesh.v1.Residency/Release", lambda v: CORRUPT, C.INVALID_ARGUMENT, "request:"),
]


def _valid_call(v: Valid, service: str, method: str = "") -> tuple[str, object]:
    if method == ENCODE_IMAGE:
        return ENCODE_IMAGE, _image_request(mask=_png(mode="L"))
    if method.startswith("/fluxmesh.v1.Residency/"):
        return RESIDENCY[service], b""
    return {
        "orchestrator": (GENERATE, v.generate),
        "encoder": (ENCODE, v.encode),
        "denoiser": (DENOISE, v.denoise),
        "vae": (DECODE, v.decode),
    }[service]


@pytest.mark.parametrize(
    "service,method",
    [("orchestrator", "/fluxmesh.v1.Generator/ListLoras"), ("denoiser", "/fluxmesh.v1.Denoiser/ListLoras")],
)
def test_odd_lora_directory_entries_do_not_break_the_listing(addresses, rpc, lora_dir, service, method):
    code, details, [raw] = rpc(addresses[service], method, common_pb2.ListLorasRequest())
    assert code == C.OK, details
    assert sorted(lora.name for lora in common_pb2.ListLorasResponse.FromString(raw).loras) == [
        "broken",
        "float8",
        "good",
    ]  # files a request may name (reading them is another matter)
    assert str(lora_dir).encode() not in raw


def test_the_corpus_covers_every_rpc():
    assert len(CASES) >= 50
    covered = {method for _, method, *_ in CASES}
    assert {GENERATE, ENCODE, DENOISE, DECODE, ENCODE_IMAGE, *INFO.values(), *RESIDENCY.values()} <= covered


@pytest.mark.parametrize("name,method,build,code,named", CASES, ids=[case[0] for case in CASES])
def test_malformed_request_gets_its_status_and_the_service_keeps_serving(
    cluster, addresses, rpc, valid, name, method, build, code, named
):
    service = SERVICE_OF.get(method, "orchestrator")
    got, details, _ = rpc(addresses[service], method, build(valid))
    assert got == code, (got, details)
    if code == C.INVALID_ARGUMENT and named.endswith(":"):
        assert details.startswith(named), details
    else:
        assert named in details, details
    assert all(child.process.poll() is None for child in cluster.children)
    good_method, good = _valid_call(valid, service, method)
    assert rpc(addresses[service], good_method, good)[0] == C.OK


# --- property-based fuzz -------------------------------------------------------------------

NEVER = {C.INTERNAL, C.UNKNOWN, C.UNAVAILABLE, C.DATA_LOSS}
FIELDS = {
    "prompt",
    "prompt_2",
    "width",
    "height",
    "steps",
    "guidance",
    "num_images",
    "max_sequence_length",
    "loras",
    "preview",
    "request",
    "priority",
    "seed",
}
SIDES = st.sampled_from([-64, 1, 15, 16, 48, 64, 65, 80, 2064, 1 << 20, 2**31 - 1])
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True, width=32), st.sampled_from([0.0, 3.5]))
FUZZ = settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _picker(draw, near_valid: bool | None = None):
    """Half the draws are near-valid (each field valid 9 times in 10), so the success path gets
    fuzzed too; the other half are hostile throughout."""
    if near_valid is None:
        near_valid = draw(st.booleans())

    def pick(valid, hostile):
        use_valid = near_valid and draw(st.integers(0, 9)) > 0
        return draw(valid if use_valid else hostile)

    pick.near_valid = near_valid
    return pick


@st.composite
def generate_requests(draw) -> generator_pb2.GenerateRequest:
    pick = _picker(draw)
    request = generator_pb2.GenerateRequest(
        prompt=pick(st.sampled_from([PROMPT, "a fox", "ü 🦊"]), st.one_of(st.text(max_size=40), st.just(" "))),
        prompt_2=pick(st.sampled_from(["", "in the snow"]), st.text(max_size=20)),
        width=pick(st.sampled_from([64, 80]), SIDES),
        height=pick(st.sampled_from([64, 96]), SIDES),
        num_images=pick(st.sampled_from([0, 1]), st.sampled_from([-1, 9, 2**31 - 1])),
        max_sequence_length=pick(st.sampled_from([0, 8]), st.sampled_from([-1, 513, 2**31 - 1])),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        # never the 28-step default: keep valid draws cheap
        steps=pick(st.sampled_from([1, 2]), st.sampled_from([-1, 0, 101, 2**31 - 1])),
    )
    if draw(st.booleans()):
        request.guidance = pick(st.sampled_from([0.0, 3.5, -2.0]), FLOATS)
    if draw(st.booleans()):
        request.seed = draw(st.integers(0, 2**64 - 1))
    for _ in range(pick(st.just(0), st.integers(1, 2))):
        request.loras.add(name=draw(st.sampled_from(["", "missing", "../up", "broken", "a/b"])), weight=draw(FLOATS))
    if draw(st.booleans()):
        request.preview.kind = pick(st.just(0), st.integers(-3, 5))
    return request


@FUZZ
@given(request=generate_requests())
def test_fuzz_generate(cluster, addresses, rpc, request):
    code, details, events = rpc(addresses["orchestrator"], GENERATE, request)
    event(code.name)  # shown by --hypothesis-show-statistics: how many draws were valid
    assert code not in NEVER, (code, details)
    if code == C.INVALID_ARGUMENT:
        named = re.sub(r"^(encoder|denoiser|vae) stage: ", "", details)  # a stage's answer, relayed
        assert named.split(":")[0].split("[")[0].split(".")[0] in FIELDS, details
    if code == C.OK:
        result = generator_pb2.GenerateEvent.FromString(events[-1]).result
        assert (result.width, result.height) == (request.width, request.height)


@st.composite
def tensors(draw, shape: tuple[int, ...], near_valid: bool) -> common_pb2.Tensor:
    """Tensors meant for `shape`: near-valid ones (right dtype, shape and byte count, values that
    may still be NaN/Inf) or hostile ones (any dtype name, any dims, any bytes)."""
    pick = _picker(draw, near_valid)
    dtype = pick(
        st.sampled_from(["float32"]),
        st.one_of(st.sampled_from(["float16", "bfloat16", "uint8", "int64"]), st.text(max_size=8)),
    )
    dims = pick(st.just(list(shape)), st.lists(st.integers(-2, 70), min_size=0, max_size=4))
    size = {"float32": 4, "float16": 2, "bfloat16": 2, "uint8": 1}.get(dtype, 4)
    count = int(np.prod(dims)) if dims and min(dims) >= 0 else 0
    if pick(st.just(True), st.booleans()) and 0 < count * size <= 1 << 20:
        if dtype == "float32":
            element = st.floats(-4, 4, width=32) if pick(st.just(True), st.booleans()) else st.floats(width=32)
            values = draw(st.lists(element, min_size=1, max_size=4))
            data = struct.pack(f"<{count}f", *(values * count)[:count])
        else:
            data = bytes(count * size)
    else:
        data = draw(st.binary(max_size=64))
    return common_pb2.Tensor(dtype=dtype, shape=dims, data=data)


@FUZZ
@given(data=st.data())
def test_fuzz_denoise(cluster, addresses, rpc, valid, data):
    pick = _picker(data.draw)
    request = denoiser_pb2.DenoiseRequest(
        prompt_embeds=data.draw(tensors(valid.embeds.shape, pick.near_valid)),
        pooled_prompt_embeds=data.draw(tensors(valid.pooled.shape, pick.near_valid)),
        width=pick(st.sampled_from([32, 64]), SIDES),
        height=pick(st.sampled_from([16, 64]), SIDES),
        steps=pick(st.just(1), st.sampled_from([-1, 0, 101])),
        guidance=pick(st.just(3.5), FLOATS),
        seed=data.draw(st.integers(0, 2**64 - 1)),
        num_images=pick(st.sampled_from([0, 1, 2]), st.sampled_from([-1, 9])),
    )
    code, details, _ = rpc(addresses["denoiser"], DENOISE, request)
    event(code.name)  # shown by --hypothesis-show-statistics: how many draws were valid
    assert code in (C.OK, C.INVALID_ARGUMENT), (code, details)


@FUZZ
@given(data=st.data())
def test_fuzz_decode(cluster, addresses, rpc, valid, data):
    pick = _picker(data.draw)
    request = vae_pb2.DecodeRequest(
        latents=data.draw(tensors(valid.latents.shape, pick.near_valid)),
        width=pick(st.just(64), SIDES),
        height=pick(st.just(64), SIDES),
        format=pick(st.sampled_from([0, 1, 2]), st.integers(-2, 5)),
    )
    code, details, _ = rpc(addresses["vae"], DECODE, request)
    event(code.name)  # shown by --hypothesis-show-statistics: how many draws were valid
    assert code in (C.OK, C.INVALID_ARGUMENT), (code, details)


# Not Residency.Load/Release: a valid one would (rightly) change which weights the stage holds.
METHODS = [
    GENERATE,
    ENCODE,
    DENOISE,
    DECODE,
    ENCODE_IMAGE,
    *INFO.values(),
    "/fluxmesh.v1.Denoiser/ListLoras",
    "/fluxmesh.v1.Residency/Status",
]


@FUZZ
@given(method=st.sampled_from(METHODS), data=st.data())
def test_fuzz_wire_bytes(cluster, addresses, rpc, valid, method, data):
    """Raw bytes: random, or a valid request with bytes flipped, cut or inserted."""
    service = SERVICE_OF[method]
    base = _valid_call(valid, service)[1].SerializeToString() if method in (GENERATE, ENCODE, DENOISE, DECODE) else b""
    if base and data.draw(st.booleans()):
        payload = bytearray(base)
        for _ in range(data.draw(st.integers(1, 4))):
            if not payload:
                break
            at = data.draw(st.integers(0, len(payload) - 1))
            kind = data.draw(st.sampled_from(["flip", "cut", "insert"]))
            if kind == "flip":
                payload[at] ^= data.draw(st.integers(1, 255))
            elif kind == "cut":
                del payload[at:]
            else:
                payload[at:at] = data.draw(st.binary(min_size=1, max_size=8))
        payload = bytes(payload)
    else:
        payload = data.draw(st.binary(max_size=128))
    # A flipped byte can turn a cheap valid request into a slow valid one: the deadline bounds it.
    code, details, _ = rpc(addresses[service], method, payload, timeout=20)
    event(code.name)  # shown by --hypothesis-show-statistics: how many draws were valid
    assert code not in NEVER, (method, code, details)


def test_everything_still_serves_after_the_fuzz(cluster, addresses, rpc, valid):
    assert all(child.process.poll() is None for child in cluster.children)
    code, details, events = rpc(addresses["orchestrator"], GENERATE, valid.generate)
    assert code == C.OK, details
    assert generator_pb2.GenerateEvent.FromString(events[-1]).result.images
