"""ControlNets through the four real processes: a denoiser holding an InstantX, a Union and an
XLabs ControlNet (tiny, in their diffusers layouts) returns FluxControlNetPipeline's pixels on
the same folders, inputs and seed (<= 1 per 8-bit channel), FluxMultiControlNetModel's for two
at once, with a LoRA stacked, and in sequential mode (the ControlNets load and release with the
transformer); bad inputs are refused naming the field before any stage works."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import stage_metadata
from factories import PROMPT, bare_denoise_request, init_and_mask, max_abs_diff, within_one
from fluxmesh.v1 import common_pb2, generator_pb2
from test_family import (
    _cluster,
    _generate,
    _images,
    _load_all,
    _pixels,
    _png,
    _reference,
    _refused,
    _sequential_orchestrator,
    _stage_requests,
    canny_as_controlnet_aux,
)

CONTROLNET = generator_pb2.REFERENCE_ROLE_CONTROLNET
INSTANTX, UNION, XLABS = 0, 1, 2  # the denoiser's --controlnet order
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
SIZE = dict(width=80, height=64)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("controlnet")
    variants = ("base", "controlnet", "controlnet-union", "controlnet-xlabs")
    return {variant: write_tiny_model(root / variant, variant=variant) for variant in variants}


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory) -> Path:
    from lora_fixtures import write_lora

    root = tmp_path_factory.mktemp("controlnet-loras")
    write_lora("kohya", root / "style.safetensors", models["base"], seed=5)  # transformer and CLIP keys
    return root


@pytest.fixture(scope="module")
def cluster(models, lora_dir):
    nets = [f"--controlnet={models[v]}" for v in ("controlnet", "controlnet-union", "controlnet-xlabs")]
    loras = ["--lora-dir", str(lora_dir)]
    with _cluster(models["base"], encoder=loras, denoiser=[*nets, *loras]) as running:
        yield running


# -- the oracle ----------------------------------------------------------------------------------


@cache
def _controlnet(folder: str):
    from diffusers import FluxControlNetModel

    return FluxControlNetModel.from_pretrained(folder, local_files_only=True)


def expected(
    models,
    nets: list[str],
    control_image,
    *,
    seed: int,
    lora: tuple[str, float] | None = None,
    pipeline: str = "FluxControlNetPipeline",
    **call,
):
    """FluxControlNetPipeline (or `pipeline`: its Img2Img / Inpaint variant) on the base folder with
    these ControlNets (several: FluxMultiControlNetModel)."""
    import diffusers
    import torch
    from diffusers import FluxMultiControlNetModel

    modules = [_controlnet(str(models[net])) for net in nets]
    controlnet = modules[0] if len(modules) == 1 else FluxMultiControlNetModel(modules)
    pipe = getattr(diffusers, pipeline).from_pretrained(
        str(models["base"]), controlnet=controlnet, local_files_only=True
    )
    pipe.set_progress_bar_config(disable=True)
    if lora is not None:
        pipe.load_lora_weights(lora[0], adapter_name="style")
        pipe.set_adapters(["style"], adapter_weights=[lora[1]])
    return pipe(
        prompt=PROMPT, control_image=control_image, generator=torch.Generator("cpu").manual_seed(seed), **call
    ).images


def _plain(cluster, **options) -> Image.Image:
    return _pixels(_generate(cluster.address, [], **options))[0]


# -- one ControlNet ------------------------------------------------------------------------------


def test_instantx_with_scale_and_span_matches_the_pipeline(cluster, models):
    image = _images(1, (72, 56))[0]
    options = dict(SIZE, steps=3, guidance=3.5, seed=7, num_images=2)
    reference = _reference(CONTROLNET, image, controlnet=INSTANTX, scale=0.7, control_start=0.2, control_end=0.9)
    got = _pixels(_generate(cluster.address, [reference], **options))
    want = expected(
        models,
        ["controlnet"],
        image,
        seed=7,
        controlnet_conditioning_scale=0.7,
        control_guidance_start=0.2,
        control_guidance_end=0.9,
        **SIZE,
        num_inference_steps=3,
        guidance_scale=3.5,
        num_images_per_prompt=2,
    )
    assert len(got) == 2 and within_one(got, want)
    assert max_abs_diff(got[0], _plain(cluster, **options)) > 1  # guards the oracle: the ControlNet acts


def test_union_mode_with_server_canny_matches_the_pipeline(cluster, models):
    photo = _images(2, (64, 64))[0]
    options = dict(SIZE, steps=2, guidance=3.5, seed=3)
    reference = _reference(
        CONTROLNET, photo, controlnet=UNION, controlnet_mode=4, preprocess=common_pb2.CONTROL_PREPROCESS_CANNY
    )
    got = _pixels(_generate(cluster.address, [reference], **options))[0]
    want = expected(
        models,
        ["controlnet-union"],
        canny_as_controlnet_aux(photo),
        seed=3,
        control_mode=4,
        **SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(got, want) <= 1
    other_mode = _generate(
        cluster.address, [_reference(CONTROLNET, photo, controlnet=UNION, controlnet_mode=1)], **options
    )
    assert max_abs_diff(got, _pixels(other_mode)[0]) > 1  # the mode is the model's input


def test_xlabs_takes_pixels_and_matches_the_pipeline(cluster, models):
    image = _images(3, (80, 64))[0]
    options = dict(SIZE, steps=2, guidance=3.5, seed=5)
    got = _pixels(_generate(cluster.address, [_reference(CONTROLNET, image, controlnet=XLABS, scale=0.9)], **options))
    want = expected(
        models,
        ["controlnet-xlabs"],
        image,
        seed=5,
        controlnet_conditioning_scale=0.9,
        **SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
    )
    assert max_abs_diff(got[0], want[0]) <= 1
    assert max_abs_diff(got[0], _plain(cluster, **options)) > 1


# -- several, and with a LoRA --------------------------------------------------------------------


def test_two_controlnets_match_flux_multi_controlnet_model(cluster, models):
    images = _images(4, (72, 56), (64, 64))
    options = dict(SIZE, steps=3, guidance=3.5, seed=11)
    references = [
        _reference(CONTROLNET, images[0], controlnet=INSTANTX, scale=0.6, control_start=0.3),
        _reference(CONTROLNET, images[1], controlnet=UNION, controlnet_mode=5, scale=1.2, control_end=0.7),
    ]
    got = _pixels(_generate(cluster.address, references, **options))[0]
    want = expected(
        models,
        ["controlnet", "controlnet-union"],
        images,
        seed=11,
        control_mode=[None, 5],
        controlnet_conditioning_scale=[0.6, 1.2],
        control_guidance_start=[0.3, 0.0],
        control_guidance_end=[1.0, 0.7],
        **SIZE,
        num_inference_steps=3,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(got, want) <= 1
    alone = _generate(cluster.address, references[:1], **options)
    assert max_abs_diff(got, _pixels(alone)[0]) > 1  # the second ControlNet adds its residuals


def test_a_lora_stacked_on_a_controlnet_matches(cluster, models, lora_dir):
    """A kohya LoRA (transformer and CLIP keys), as FluxControlNetPipeline.load_lora_weights."""
    image = _images(5, (64, 64))[0]
    options = dict(SIZE, steps=2, guidance=3.5, seed=12)
    result = _generate(
        cluster.address,
        [_reference(CONTROLNET, image, controlnet=INSTANTX)],
        loras=[common_pb2.LoraWeight(name="style", weight=0.8)],
        **options,
    )
    want = expected(
        models,
        ["controlnet"],
        image,
        seed=12,
        lora=(str(lora_dir / "style.safetensors"), 0.8),
        **SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(_pixels(result)[0], want) <= 1


def test_image_to_image_with_a_controlnet_matches_its_img2img_pipeline(cluster, models):
    control = _images(10, (64, 64))[0]
    init, _ = init_and_mask(width=80, height=64, seed=11)
    result = _generate(
        cluster.address,
        [_reference(CONTROLNET, control, controlnet=INSTANTX, scale=0.8)],
        init_image=_png(init),
        strength=0.7,
        steps=4,
        guidance=3.5,
        seed=14,
        num_images=2,
    )
    want = expected(
        models,
        ["controlnet"],
        control,
        seed=14,
        pipeline="FluxControlNetImg2ImgPipeline",
        image=init,
        strength=0.7,
        controlnet_conditioning_scale=0.8,
        **SIZE,
        num_inference_steps=4,
        guidance_scale=3.5,
        num_images_per_prompt=2,
    )
    got = _pixels(result)
    assert len(got) == 2 and within_one(got, want)


def test_inpainting_with_a_union_controlnet_matches_its_inpaint_pipeline(cluster, models):
    control = _images(12, (64, 64))[0]
    init, mask = init_and_mask(width=80, height=64, seed=13)
    result = _generate(
        cluster.address,
        [_reference(CONTROLNET, control, controlnet=UNION, controlnet_mode=2)],
        init_image=_png(init),
        mask_image=_png(mask),
        strength=0.8,
        steps=4,
        guidance=3.5,
        seed=15,
    )
    want = expected(
        models,
        ["controlnet-union"],
        control,
        seed=15,
        pipeline="FluxControlNetInpaintPipeline",
        image=init,
        mask_image=mask,
        strength=0.8,
        control_mode=2,
        **SIZE,
        num_inference_steps=4,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(_pixels(result)[0], want) <= 1


def test_true_cfg_with_a_controlnet_matches(cluster, models):
    """FluxControlNetPipeline's true CFG: the negative pass takes the same ControlNet residuals."""
    image = _images(8, (64, 64))[0]
    options = dict(SIZE, steps=2, guidance=3.5, seed=13)
    result = _generate(
        cluster.address,
        [_reference(CONTROLNET, image, controlnet=UNION, controlnet_mode=1)],
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        **options,
    )
    want = expected(
        models,
        ["controlnet-union"],
        image,
        seed=13,
        control_mode=1,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
        **SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(_pixels(result)[0], want) <= 1


# -- what the stages report and refuse -----------------------------------------------------------


def test_info_lists_the_controlnets(cluster):
    from fluxmesh.client import Client

    with Client(cluster.address, timeout=60) as client:
        denoiser = next(stage for stage in client.info().stages if stage.stage == "denoiser")
    assert [(c.name, c.union_modes, c.pixels) for c in denoiser.controlnets] == [
        ("controlnet", 0, False),
        ("controlnet-union", 10, False),
        ("controlnet-xlabs", 0, True),
    ]


def _bad_cases():
    image = _images(0, (64, 64))[0]
    init = _images(9, (80, 64))[0]

    def net(**fields):
        return _reference(CONTROLNET, image, **fields)

    return [
        ("no-such-controlnet", [net(controlnet=3)], {}, PRECONDITION, "references[0].controlnet"),
        ("negative-index", [net(controlnet=-1)], {}, INVALID, "references[0].controlnet"),
        (
            "mode-the-union-lacks",
            [net(controlnet=UNION, controlnet_mode=10)],
            {},
            PRECONDITION,
            "references[0].controlnet_mode",
        ),
        (
            "mode-on-a-plain-one",
            [net(controlnet=INSTANTX, controlnet_mode=2)],
            {},
            PRECONDITION,
            "references[0].controlnet_mode",
        ),
        ("negative-mode", [net(controlnet=UNION, controlnet_mode=-1)], {}, INVALID, "references[0].controlnet_mode"),
        ("scale-too-high", [net(scale=2.5)], {}, INVALID, "references[0].scale"),
        ("scale-negative", [net(scale=-0.1)], {}, INVALID, "references[0].scale"),
        ("start-after-end", [net(control_start=0.6, control_end=0.4)], {}, INVALID, "references[0].control_end"),
        ("end-past-one", [net(control_end=1.5)], {}, INVALID, "references[0].control_end"),
        ("start-negative", [net(control_start=-0.5)], {}, INVALID, "references[0].control_start"),
        (
            "depth-without-a-model",
            [net(preprocess=common_pb2.CONTROL_PREPROCESS_DEPTH)],
            {},
            PRECONDITION,
            "references[0].preprocess",
        ),
        ("xlabs-with-instantx", [net(controlnet=XLABS), net(controlnet=INSTANTX)], {}, INVALID, "references"),
        ("five-images", [net()] * 5, {}, INVALID, "references"),
        (
            "union-batched-with-an-init-image",  # diffusers' img2img/inpaint pipelines cannot batch its mode
            [net(controlnet=UNION)],
            {"init_image": _png(init), "num_images": 2},
            INVALID,
            "num_images",
        ),
        (
            "controlnet-field-on-redux",
            [_reference(generator_pb2.REFERENCE_ROLE_REDUX, image, controlnet=1)],
            {},
            INVALID,
            "references[0].controlnet",
        ),
        (
            "not-an-image",
            [generator_pb2.Reference(role=CONTROLNET, image=b"GIF89a....")],
            {},
            INVALID,
            "references[0].image",
        ),
    ]


@pytest.mark.parametrize(
    "references,fields,code,field", [case[1:] for case in _bad_cases()], ids=[case[0] for case in _bad_cases()]
)
def test_bad_controlnet_references_are_named_before_any_stage_works(cluster, references, fields, code, field):
    before = _stage_requests(cluster)
    error = _refused(cluster.address, references, **SIZE, steps=2, **fields)
    assert error.code() == code and error.details().startswith(f"{field}:"), (error.code(), error.details())
    assert _stage_requests(cluster) == before


def test_the_denoiser_checks_what_it_is_sent_and_keeps_serving(cluster):
    """A denoiser driven by something else than the orchestrator still names the field."""
    import torch

    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.v1 import denoiser_pb2_grpc

    denoiser = next(child.address for child in cluster.children if child.name == "denoiser")
    request = bare_denoise_request(
        width=64,
        height=64,
        steps=1,
        num_images=1,
    )
    good = dict(controlnet=INSTANTX, posterior=to_pb(torch.zeros(1, 32, 8, 8)), scale=1.0, end=1.0)
    cases = [
        (dict(good, posterior=to_pb(torch.zeros(1, 32, 8, 6))), "conditioning.controlnets[0].posterior.shape"),
        (dict(good, controlnet=XLABS), "conditioning.controlnets[0].pixels"),  # XLabs takes pixels
        (dict(good, end=0.0), "conditioning.controlnets[0].end"),  # unset: before start
        (dict(good, scale=3.0), "conditioning.controlnets[0].scale"),
        (dict(good, controlnet=7), "conditioning.controlnets[0].controlnet"),
    ]
    with grpc.insecure_channel(denoiser) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        for fields, field in cases:
            request.conditioning.Clear()
            request.conditioning.controlnets.add(**fields)
            with pytest.raises(grpc.RpcError) as caught:
                list(stub.Denoise(request, timeout=30, metadata=stage_metadata(cluster.stage_token)))
            assert caught.value.code() == INVALID and caught.value.details().startswith(f"{field}:"), (
                caught.value.details()
            )
        request.conditioning.Clear()
        request.conditioning.controlnets.add(**good)
        events = list(stub.Denoise(request, timeout=60, metadata=stage_metadata(cluster.stage_token)))
    assert events[-1].HasField("latents")  # ... and it serves the well-formed request


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_plan_counts_the_controlnets_as_the_denoiser_loads_them(models, dtype):
    """`fluxmesh plan --controlnet` from the file headers equals what the denoiser holds."""
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.runtime.memory import module_bytes
    from fluxmesh.services.tools.planning import make_plan

    nets = [models["controlnet"], models["controlnet-xlabs"]]
    plan = make_plan(models["base"], vram=2**30, width=64, height=64, dtype=dtype, controlnets=nets)
    denoiser = next(s for s in plan.stages if s.stage == "denoiser")
    loaded = DenoiserEngine(models["base"], Device.parse("cpu", dtype), controlnets=nets)
    assert denoiser.weight_bytes == loaded.weight_bytes() > module_bytes(loaded.transformer)
    assert sum("ControlNet" in source for source in denoiser.sources) == 2


# -- SDK and CLI ---------------------------------------------------------------------------------


def test_sdk_and_cli_send_the_same_references(cluster, tmp_path):
    """Reference("controlnet", ...) and `fluxmesh generate --controlnet-image PATH:KEY=VALUE,...`
    build the requests the raw tests above prove against diffusers."""
    import subprocess
    import sys

    from fluxmesh.client import Client, Reference

    images = _images(6, (64, 64), (72, 56))
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    for image, path in zip(images, paths):
        image.save(path)
    options = dict(steps=2, guidance=3.5, seed=4, **SIZE)
    raw = _generate(
        cluster.address,
        [
            _reference(CONTROLNET, images[0], controlnet=UNION, controlnet_mode=2, scale=0.8, control_end=0.5),
            _reference(CONTROLNET, images[1], preprocess=common_pb2.CONTROL_PREPROCESS_CANNY, control_start=0.25),
        ],
        **options,
    )
    with Client(cluster.address, timeout=300) as client:
        sdk = client.generate(
            PROMPT,
            references=[
                Reference("controlnet", paths[0], controlnet=UNION, controlnet_mode=2, scale=0.8, control_end=0.5),
                Reference("controlnet", images[1], preprocess="canny", control_start=0.25),
            ],
            **options,
        )
    assert sdk.image_data == [image.data for image in raw.images]
    flags = [f"--{key.replace('_', '-')}={value}" for key, value in options.items()]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "generate",
            "-p",
            PROMPT,
            "--address",
            cluster.address,
            *flags,
            "--controlnet-image",
            f"{paths[0]}:net=1,mode=2,scale=0.8,end=0.5",
            "--controlnet-image",
            f"{paths[1]}:preprocess=canny,start=0.25",
            "-o",
            str(tmp_path / "out.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "out.png").read_bytes() == raw.images[0].data


# -- sequential mode (last: it leaves the stages released; they are loaded back) ------------------


def test_sequential_mode_swaps_the_controlnets_with_the_transformer(cluster, models):
    from fluxmesh.v1 import common_pb2 as common
    from fluxmesh.v1 import denoiser_pb2_grpc

    images = _images(7, (64, 64), (80, 64))
    references = [
        _reference(CONTROLNET, images[0], controlnet=INSTANTX, scale=0.8),
        _reference(CONTROLNET, images[1], controlnet=UNION, controlnet_mode=3),
    ]
    options = dict(SIZE, steps=2, guidance=3.5, seed=9)
    sequential, stages = _sequential_orchestrator(cluster)
    try:
        result = _generate(sequential.address, references, **options)
        with grpc.insecure_channel(stages["denoiser"]) as channel:
            info = denoiser_pb2_grpc.DenoiserStub(channel).Info(
                common.InfoRequest(), timeout=10, metadata=stage_metadata(cluster.stage_token)
            )
    finally:
        sequential.stop()
        _load_all(stages, cluster.stage_token)
    want = expected(
        models,
        ["controlnet", "controlnet-union"],
        images,
        seed=9,
        control_mode=[None, 3],
        controlnet_conditioning_scale=[0.8, 1.0],
        **SIZE,
        num_inference_steps=2,
        guidance_scale=3.5,
    )[0]
    assert max_abs_diff(_pixels(result)[0], want) <= 1
    assert info.residency != "resident" and info.weight_bytes == 0  # the ControlNets went with the transformer
