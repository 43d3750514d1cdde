"""XLabs' FLUX IP-Adapter through the four real processes: the encoder (--ip-adapter-image-encoder)
makes the CLIP vision embeds, the denoiser (--ip-adapter) runs the adapter's processors, and the
image equals FluxPipeline after load_ip_adapter + set_ip_adapter_scale on the same tiny files,
inputs and seed (<= 1 per 8-bit channel): alone, with true CFG (the request's negative image or
diffusers' black default), with a LoRA stacked, beside plain requests in the batcher, and in
sequential mode. Bad input is named before any stage works and the service keeps serving."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from functools import cache
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import stage_metadata
from factories import PROMPT, bare_denoise_request, max_abs_diff, within_one
from fluxmesh.v1 import common_pb2, generator_pb2
from test_family import (
    INVALID,
    PRECONDITION,
    _cluster,
    _generate,
    _images,
    _load_all,
    _pixels,
    _png,
    _refused,
    _sequential_orchestrator,
    _stage_requests,
)

IP_ADAPTER, KONTEXT = generator_pb2.REFERENCE_ROLE_IP_ADAPTER, generator_pb2.REFERENCE_ROLE_KONTEXT
SIZE = dict(width=96, height=64)  # not square: diffusers' black negative is zeros((width, height, 3))


def _ip(image: Image.Image, **fields) -> generator_pb2.Reference:
    return generator_pb2.Reference(role=IP_ADAPTER, image=_png(image), **fields)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    """Written by the CLI, as a user would: `fluxmesh tiny-model DIR --variant ip-adapter`."""
    folder = tmp_path_factory.mktemp("ip-adapter") / "xlabs"
    subprocess.run(
        [sys.executable, "-m", "fluxmesh.cli", "tiny-model", str(folder), "--variant", "ip-adapter"],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert sorted(p.name for p in folder.iterdir()) == ["image_encoder", "ip_adapter.safetensors"]
    return folder


@pytest.fixture(scope="module")
def lora_dir(dev_model, tmp_path_factory) -> Path:
    from lora_fixtures import write_lora

    root = tmp_path_factory.mktemp("ip-adapter-loras")
    write_lora("kohya", root / "style.safetensors", dev_model, seed=5)
    return root


@pytest.fixture(scope="module")
def ip_cluster(dev_model, adapter, lora_dir):
    loras = ["--lora-dir", str(lora_dir)]
    with _cluster(
        dev_model,
        encoder=["--ip-adapter-image-encoder", str(adapter / "image_encoder"), *loras],
        denoiser=["--ip-adapter", str(adapter / "ip_adapter.safetensors"), *loras],
    ) as cluster:
        yield cluster


# -- the oracle ----------------------------------------------------------------------------------


@cache
def _pipe(folder: str, adapter: str, lora: str | None = None):
    """FluxPipeline with the IP-Adapter loaded as diffusers' docs do (and a LoRA, if given)."""
    import torch
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora, adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[0.8])
    pipe.load_ip_adapter(
        adapter,
        weight_name="ip_adapter.safetensors",
        image_encoder_pretrained_model_name_or_path=str(Path(adapter) / "image_encoder"),
        image_encoder_dtype=torch.float32,
        local_files_only=True,
    )
    return pipe


def expected(dev_model, adapter, *, scale: float, seed: int, lora: Path | None = None, **call) -> list[Image.Image]:
    import torch

    pipe = _pipe(str(dev_model), str(adapter), str(lora) if lora else None)
    pipe.set_ip_adapter_scale(scale)
    return pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), **call).images


# -- equal to diffusers ----------------------------------------------------------------------------


def test_image_prompt_matches_flux_pipeline_with_the_ip_adapter(ip_cluster, dev_model, adapter):
    image = _images(1, (72, 56))[0]
    result = _generate(ip_cluster.address, [_ip(image, scale=0.7)], steps=3, guidance=3.5, seed=7, num_images=2, **SIZE)
    want = expected(
        dev_model,
        adapter,
        scale=0.7,
        seed=7,
        ip_adapter_image=image,
        num_inference_steps=3,
        guidance_scale=3.5,
        num_images_per_prompt=2,
        **SIZE,
    )
    got = _pixels(result)
    assert len(got) == 2 and within_one(got, want)
    # Guards the oracle: the image prompt changes the picture ...
    plain = _generate(ip_cluster.address, [], steps=3, guidance=3.5, seed=7, **SIZE)
    assert max_abs_diff(got[0], _pixels(plain)[0]) > 1
    # ... and once it is done the adapter is out of the transformer: a plain request is FluxPipeline's
    from factories import reference_images

    assert max_abs_diff(_pixels(plain)[0], reference_images(dev_model, steps=3, guidance=3.5, seed=7, **SIZE)[0]) <= 1


@pytest.mark.parametrize("negative_image", [True, False], ids=["negative-image", "black-default"])
def test_true_cfg_with_the_negative_image_prompt_matches(ip_cluster, dev_model, adapter, negative_image):
    image, negative = _images(2, (64, 64), (80, 48))
    references = [_ip(image)] + ([_ip(negative, negative=True)] if negative_image else [])
    result = _generate(
        ip_cluster.address,
        references,
        steps=2,
        guidance=3.5,
        seed=4,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        **SIZE,
    )
    want = expected(
        dev_model,
        adapter,
        scale=1.0,  # unset: the adapter's own 1.0
        seed=4,
        ip_adapter_image=image,
        negative_ip_adapter_image=negative if negative_image else None,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        num_inference_steps=2,
        guidance_scale=3.5,
        **SIZE,
    )
    assert max_abs_diff(_pixels(result)[0], want[0]) <= 1


def test_a_lora_stacked_on_the_ip_adapter_matches(ip_cluster, dev_model, adapter, lora_dir):
    """diffusers replaces the attention processors; PEFT's LoRA layers wrap the projections both
    processors call, so the LoRA still applies: equal to the pipeline with both loaded."""
    image = _images(3, (64, 64))[0]
    lora = [common_pb2.LoraWeight(name="style", weight=0.8)]
    result = _generate(ip_cluster.address, [_ip(image, scale=0.9)], steps=2, guidance=3.5, seed=12, loras=lora, **SIZE)
    call = dict(ip_adapter_image=image, num_inference_steps=2, guidance_scale=3.5, **SIZE)
    want = expected(dev_model, adapter, scale=0.9, seed=12, lora=lora_dir / "style.safetensors", **call)
    assert max_abs_diff(_pixels(result)[0], want[0]) <= 1
    without_lora = expected(dev_model, adapter, scale=0.9, seed=12, **call)
    assert max_abs_diff(_pixels(result)[0], without_lora[0]) > 1  # the LoRA shows


def test_ip_adapter_requests_never_share_a_forward_with_plain_ones(ip_cluster, dev_model, adapter):
    """Concurrent plain requests batch together (one transformer forward per step); the IP-Adapter
    request runs alone in its pipeline's loop, and every image is what it is alone."""
    image = _images(4, (64, 64))[0]
    options = dict(steps=3, guidance=3.5, **SIZE)
    jobs = [([], 1), ([], 2), ([_ip(image, scale=0.6)], 3), ([], 4)]
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda job: _generate(ip_cluster.address, job[0], seed=job[1], **options), jobs))
    for (references, seed), result in zip(jobs, results):
        alone = _generate(ip_cluster.address, references, seed=seed, **options)
        assert max_abs_diff(_pixels(result)[0], _pixels(alone)[0]) <= 1
    want = expected(
        dev_model, adapter, scale=0.6, seed=3, ip_adapter_image=image, num_inference_steps=3, guidance_scale=3.5, **SIZE
    )
    assert max_abs_diff(_pixels(results[2])[0], want[0]) <= 1


# -- capability, plan and bad input ----------------------------------------------------------------


def test_info_advertises_the_capability(ip_cluster, dev_cluster):
    from fluxmesh.client import Client

    def stages(cluster) -> dict:
        with Client(cluster.address, timeout=30) as client:
            return {s.stage: s for s in client.info().stages}

    with_ip, plain = stages(ip_cluster), stages(dev_cluster)
    assert with_ip["encoder"].ip_adapter_embed_dim == with_ip["denoiser"].ip_adapter_embed_dim == 24
    assert plain["encoder"].ip_adapter_embed_dim == plain["denoiser"].ip_adapter_embed_dim == 0


def test_plan_counts_the_weights_the_stages_load(dev_model, adapter):
    """`fluxmesh plan --ip-adapter --ip-adapter-image-encoder` adds what the engines hold once
    loaded (in this process: a stage's Info also counts the LoRA adapters other tests add)."""
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.tools.planning import make_plan

    device = Device.parse("cpu", "float32")
    file, folder = adapter / "ip_adapter.safetensors", adapter / "image_encoder"
    loaded = {
        "encoder": TextEncoderEngine(dev_model, device, ip_adapter_image_encoder=folder).weight_bytes()
        - TextEncoderEngine(dev_model, device).weight_bytes(),
        "denoiser": DenoiserEngine(dev_model, device, ip_adapter=file).weight_bytes()
        - DenoiserEngine(dev_model, device).weight_bytes(),
        "vae": 0,
    }
    kw = dict(vram=2**30, width=64, height=64, dtype="float32")
    base = make_plan(dev_model, **kw)
    plan = make_plan(dev_model, ip_adapter=file, ip_adapter_image_encoder=folder, **kw)
    assert {n.stage: n.weight_bytes - b.weight_bytes for n, b in zip(plan.stages, base.stages)} == loaded
    assert loaded["encoder"] > 0 and loaded["denoiser"] > 0


def _bad():
    image = _images(0, (64, 64))[0]
    cfg = {"negative_prompt": "x", "true_cfg_scale": 2.0}
    return [
        ("scale-too-big", [_ip(image, scale=2.5)], {}, INVALID, "references[0].scale"),
        ("scale-negative", [_ip(image, scale=-0.1)], {}, INVALID, "references[0].scale"),
        ("scale-nan", [_ip(image, scale=float("nan"))], {}, INVALID, "references[0].scale"),
        ("two-images", [_ip(image), _ip(image)], {}, INVALID, "references[1].role"),
        ("negative-without-cfg", [_ip(image), _ip(image, negative=True)], {}, INVALID, "references[1].negative"),
        ("two-negatives", [_ip(image, negative=True)] * 2, cfg, INVALID, "references[1].negative"),
        (
            "scales-differ",
            [_ip(image, scale=0.5), _ip(image, negative=True, scale=0.6)],
            cfg,
            INVALID,
            "references[1].scale",
        ),
        ("pooled-scale", [_ip(image, pooled_scale=0.5)], {}, INVALID, "references[0].pooled_scale"),
        ("keep-size", [_ip(image, keep_size=True)], {}, INVALID, "references[0].keep_size"),
        (
            "negative-on-kontext",
            [generator_pb2.Reference(role=KONTEXT, image=_png(image), negative=True)],
            {},
            INVALID,
            "references[0].negative",
        ),
        (
            "not-an-image",
            [generator_pb2.Reference(role=IP_ADAPTER, image=b"GIF89a....")],
            {},
            INVALID,
            "references[0].image",
        ),
        ("no-image", [generator_pb2.Reference(role=IP_ADAPTER)], {}, INVALID, "references[0].image"),
    ]


@pytest.mark.parametrize("references,fields,code,field", [c[1:] for c in _bad()], ids=[c[0] for c in _bad()])
def test_bad_ip_adapter_references_are_named_before_any_stage_works(ip_cluster, references, fields, code, field):
    before = _stage_requests(ip_cluster)
    error = _refused(ip_cluster.address, references, steps=1, **SIZE, **fields)
    assert error.code() == code and error.details().startswith(f"{field}:"), (error.code(), error.details())
    assert _stage_requests(ip_cluster) == before
    assert len(_generate(ip_cluster.address, [_ip(_images(0, (32, 32))[0])], steps=1, **SIZE).images) == 1  # serving


def test_a_deployment_without_the_adapter_refuses_naming_the_flag(dev_cluster):
    error = _refused(dev_cluster.address, [_ip(_images(0, (32, 32))[0])], steps=1, **SIZE)
    assert error.code() == PRECONDITION
    assert error.details().startswith("references[0].role:") and "--ip-adapter FILE" in error.details()


def test_each_stage_lacking_its_half_is_named():
    """The orchestrator's check, per missing half (a cluster each would cost a minute apiece)."""
    from fluxmesh.orchestrator.ip_adapter import check_ip_adapter
    from fluxmesh.rpc.errors import FailedPrecondition

    references = [("references[0]", _ip(_images(0, (32, 32))[0]))]
    for encoder, denoiser, flag in (
        (24, 0, "--ip-adapter FILE"),
        (0, 24, "--ip-adapter-image-encoder"),
        (16, 24, "16"),
    ):
        with pytest.raises(FailedPrecondition, match=flag):
            check_ip_adapter(references, encoder_dim=encoder, denoiser_dim=denoiser, has_negative_prompt=False)
    assert check_ip_adapter(references, encoder_dim=24, denoiser_dim=24, has_negative_prompt=False).scale == 1.0


def test_the_stages_check_what_they_are_sent(ip_cluster):
    import torch

    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.v1 import denoiser_pb2, denoiser_pb2_grpc, encoder_pb2, encoder_pb2_grpc

    stages = {child.name: child.address for child in ip_cluster.children}
    credential = stage_metadata(ip_cluster.stage_token)
    with grpc.insecure_channel(stages["encoder"]) as channel:
        stub = encoder_pb2_grpc.TextEncoderStub(channel)
        for image, field in (
            (encoder_pb2.IpAdapterImage(image=b"not a png"), "ip_adapter_image.image"),
            (encoder_pb2.IpAdapterImage(width=96), "ip_adapter_image.height"),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                stub.Encode(
                    encoder_pb2.EncodeRequest(prompts=["a"], ip_adapter_image=image), timeout=30, metadata=credential
                )
            assert caught.value.code() == INVALID and caught.value.details().startswith(f"{field}:")
    with grpc.insecure_channel(stages["denoiser"]) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        request = bare_denoise_request(
            steps=1,
            num_images=1,
            **SIZE,
        )
        for embeds, scale, field in (
            (torch.zeros(1, 24), 3.0, "ip_adapter.scale"),
            (torch.zeros(1, 16), 1.0, "ip_adapter.image_embeds.shape"),
        ):
            request.ip_adapter.CopyFrom(denoiser_pb2.IpAdapter(image_embeds=to_pb(embeds), scale=scale))
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Denoise(request, timeout=30, metadata=credential))
            assert caught.value.code() == INVALID and caught.value.details().startswith(f"{field}:")


# -- SDK and CLI -----------------------------------------------------------------------------------


def test_sdk_and_cli_send_the_same_request(ip_cluster, tmp_path):
    from fluxmesh.client import Client, Reference

    image, negative = _images(5, (64, 64), (48, 48))
    image_path, negative_path = tmp_path / "prompt.png", tmp_path / "negative.png"
    image.save(image_path)
    negative.save(negative_path)
    options = dict(steps=2, seed=3, negative_prompt="dull", true_cfg_scale=2.0, **SIZE)
    raw = _generate(ip_cluster.address, [_ip(image, scale=0.7), _ip(negative, negative=True)], **options)
    with Client(ip_cluster.address, timeout=300) as client:
        sdk = client.generate(
            PROMPT,
            references=[
                Reference("ip-adapter", image, scale=0.7),
                Reference("ip-adapter", negative_path, negative=True),
            ],
            **options,
        )
    assert sdk.image_data == [i.data for i in raw.images]
    out = tmp_path / "ip.png"
    cli = subprocess.run(
        [
            sys.executable, "-m", "fluxmesh.cli", "generate", "-p", PROMPT, "--address", ip_cluster.address,
            "--steps", "2", "--seed", "3", "--width", "96", "--height", "64",
            "--negative-prompt", "dull", "--true-cfg-scale", "2",
            "--ip-adapter-image", f"{image_path}:0.7", "--negative-ip-adapter-image", str(negative_path),
            "-o", str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert out.read_bytes() == raw.images[0].data


# -- sequential mode (last: it leaves the stages released; the test loads them back) ----------------


def test_sequential_mode_keeps_the_pixels_and_moves_the_adapter_with_the_transformer(ip_cluster):
    from fluxmesh.client import Client

    references = [_ip(_images(6, (64, 64))[0], scale=0.8)]
    options = dict(steps=2, seed=2, **SIZE)
    resident = _generate(ip_cluster.address, references, **options)
    sequential, stages = _sequential_orchestrator(ip_cluster)
    try:
        result = _generate(sequential.address, references, **options)
        assert result.timings.swaps == 3  # encoder (prompt and image embeds together), denoiser, vae
        with Client(ip_cluster.address, timeout=30) as client:
            held = {s.stage: s for s in client.info().stages}
        assert held["denoiser"].residency != "resident" and held["denoiser"].ip_adapter_embed_dim == 24
    finally:
        sequential.stop()
        _load_all(stages, ip_cluster.stage_token)
    assert [i.data for i in result.images] == [i.data for i in resident.images]
    again = _generate(ip_cluster.address, references, **options)  # loaded back: the adapter with it
    assert [i.data for i in again.images] == [i.data for i in resident.images]
