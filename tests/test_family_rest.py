"""The family's edit pipelines through the four real processes: a Kontext reference with an init
image and mask equals FluxKontextInpaintPipeline, a Control image with an init image (and mask)
FluxControlImg2ImgPipeline (FluxControlInpaintPipeline), on the same tiny folders, inputs and
seed (<= 1 per 8-bit channel), in resident and in sequential mode; bad combinations are named
before any stage works; Kontext's reference tokens count against the work budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from PIL import Image

from conftest import stage_metadata
from factories import PROMPT, bare_denoise_request, init_and_mask, max_abs_diff, within_one
from fluxmesh.v1 import common_pb2, generator_pb2
from test_family import (
    CANNY,
    CONTROL,
    INVALID,
    KONTEXT,
    _cluster,
    _generate,
    _generator,
    _images,
    _load_all,
    _pipeline,
    _pixels,
    _png,
    _reference,
    _refused,
    _sequential_orchestrator,
    _stage_requests,
    canny_as_controlnet_aux,
    control_expected,
)

DEPTH = common_pb2.CONTROL_PREPROCESS_DEPTH


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("family-rest")
    return {
        variant: write_tiny_model(root / variant, variant=variant)
        for variant in ("kontext", "control", "base", "depth")
    }


@pytest.fixture(scope="module")
def control_lora(models) -> Path:
    """The tiny Canny Control LoRA, as `fluxmesh tiny-model --variant control-lora` writes it."""
    from fluxmesh.services.tools.tiny_model import CONTROL_LORA_FILE, write_tiny_model

    return write_tiny_model(models["base"].parent / "canny-lora", variant="control-lora") / CONTROL_LORA_FILE


@pytest.fixture(scope="module")
def style_lora(models, tmp_path_factory) -> Path:
    from lora_fixtures import write_lora

    return write_lora(
        "kohya", tmp_path_factory.mktemp("family-rest-loras") / "style.safetensors", models["base"], seed=5
    )


@pytest.fixture(scope="module")
def kontext_cluster(models):
    with _cluster(models["kontext"]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def control_cluster(models):
    """A FLUX.1-Canny/Depth-shaped model; the vae stage has a depth model."""
    with _cluster(models["control"], vae=["--depth-model", str(models["depth"])]) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def lora_cluster(models, control_lora, style_lora):
    """A base FLUX.1 model whose denoiser fuses the Canny Control LoRA (and serves per-request LoRAs)."""
    loras = ["--lora-dir", str(style_lora.parent)]
    with _cluster(models["base"], denoiser=["--control-lora", str(control_lora), *loras], encoder=loras) as cluster:
        yield cluster


def _edit(init: Image.Image, mask: Image.Image | None = None, **fields) -> dict:
    return {"init_image": _png(init), **({"mask_image": _png(mask)} if mask is not None else {}), **fields}


def _all_within_one(result: generator_pb2.Result, expected: list[Image.Image]) -> bool:
    return within_one(_pixels(result), expected)


# -- Kontext inpainting --------------------------------------------------------------------------


def kontext_inpaint_expected(models, init, reference, mask, *, seed: int, keep_size: bool = True, **call):
    pipe = _pipeline("FluxKontextInpaintPipeline", str(models["kontext"]))
    return pipe(
        image=init,
        image_reference=reference,
        mask_image=mask,
        prompt=PROMPT,
        _auto_resize=not keep_size,
        generator=_generator(seed),
        **call,
    ).images


def test_kontext_inpainting_matches_flux_kontext_inpaint_pipeline(kontext_cluster, models):
    init, mask = init_and_mask(80, 64, seed=1)
    reference = _images(2, (256, 192))[0]
    result = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, reference, keep_size=True)],
        **_edit(init, mask, strength=0.8),
        steps=4,
        guidance=2.5,
        seed=4,
        num_images=2,
    )
    assert (result.width, result.height) == (80, 64)  # the init image's size, as the pipeline paints
    expected = kontext_inpaint_expected(
        models, init, reference, mask, seed=4, strength=0.8, num_inference_steps=4, guidance_scale=2.5,
        num_images_per_prompt=2,
    )  # fmt: skip
    assert _all_within_one(result, expected)
    # Guards the oracle: the reference's tokens are in (without one the pipeline takes the init
    # image's as context); another image of the same size barely moves this random tiny model.
    other = kontext_inpaint_expected(
        models, init, None, mask, seed=4, strength=0.8, num_inference_steps=4, guidance_scale=2.5
    )
    assert max_abs_diff(_pixels(result)[0], other[0]) > 1


def test_kontext_inpainting_defaults_to_the_pipelines_strength_and_takes_true_cfg(kontext_cluster, models):
    init, mask = init_and_mask(64, 64, seed=3)
    reference = _images(4, (80, 64))[0]
    result = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, reference, keep_size=True)],
        **_edit(init, mask),  # no strength: FluxKontextInpaintPipeline's 1.0
        steps=2,
        guidance=2.5,
        seed=7,
        negative_prompt="blurry",
        true_cfg_scale=2.0,
    )
    expected = kontext_inpaint_expected(
        models, init, reference, mask, seed=7, num_inference_steps=2, guidance_scale=2.5, negative_prompt="blurry",
        true_cfg_scale=2.0,
    )  # fmt: skip
    assert _all_within_one(result, expected)


# -- Control with an init image ------------------------------------------------------------------


def control_edit_expected(models, control, init, mask=None, *, seed: int, **call):
    name = "FluxControlInpaintPipeline" if mask is not None else "FluxControlImg2ImgPipeline"
    masks = {"mask_image": mask} if mask is not None else {}
    pipe = _pipeline(name, str(models["control"]))
    return pipe(prompt=PROMPT, image=init, control_image=control, generator=_generator(seed), **masks, **call).images


def test_control_image_to_image_matches_flux_control_img2img_pipeline(control_cluster, models):
    init, _ = init_and_mask(80, 64, seed=5)
    control = _images(6, (72, 56))[0]  # resized to the output size, as the pipeline does
    result = _generate(
        control_cluster.address,
        [_reference(CONTROL, control)],
        **_edit(init, strength=0.7),
        steps=4,
        guidance=10.0,
        seed=2,
        num_images=2,
    )
    expected = control_edit_expected(
        models, control, init, seed=2, strength=0.7, width=80, height=64, num_inference_steps=4, guidance_scale=10.0,
        num_images_per_prompt=2,
    )  # fmt: skip
    assert _all_within_one(result, expected)
    plain = _generate(control_cluster.address, [_reference(CONTROL, control)], width=80, height=64, steps=4, seed=2)
    assert max_abs_diff(_pixels(result)[0], _pixels(plain)[0]) > 1  # the init image shows


def test_control_inpainting_with_server_side_canny_matches_flux_control_inpaint_pipeline(control_cluster, models):
    init, mask = init_and_mask(64, 80, seed=7)
    photo = _images(8, (64, 80))[0]
    result = _generate(
        control_cluster.address,
        [_reference(CONTROL, photo, preprocess=CANNY)],
        **_edit(init, mask),  # no strength: the pipeline's 0.6
        steps=5,
        guidance=10.0,
        seed=3,
    )
    expected = control_edit_expected(
        models, canny_as_controlnet_aux(photo), init, mask, seed=3, width=64, height=80, num_inference_steps=5,
        guidance_scale=10.0,
    )  # fmt: skip
    assert _all_within_one(result, expected)
    img2img = control_edit_expected(
        models, canny_as_controlnet_aux(photo), init, seed=3, width=64, height=80, num_inference_steps=5,
        guidance_scale=10.0,
    )  # fmt: skip
    assert max_abs_diff(_pixels(result)[0], img2img[0]) > 1  # the mask keeps the outside from the init image


def test_server_side_depth_equals_the_transformers_depth_pipeline_then_flux_control(control_cluster, models):
    """preprocess DEPTH on the vae stage's --depth-model: transformers' depth-estimation pipeline on
    the same folder, its map as RGB, then FluxControlPipeline, by hand."""
    from transformers import pipeline

    photo = _images(15, (96, 64))[0]
    result = _generate(
        control_cluster.address, [_reference(CONTROL, photo, preprocess=DEPTH)], width=96, height=64, steps=2,
        guidance=10.0, seed=8,
    )  # fmt: skip
    depth = pipeline("depth-estimation", model=str(models["depth"]))(photo)["depth"].convert("RGB")
    expected = control_expected(models, depth, seed=8, width=96, height=64, num_inference_steps=2, guidance_scale=10.0)
    assert _all_within_one(result, expected)
    unprocessed = _generate(
        control_cluster.address, [_reference(CONTROL, photo)], width=96, height=64, steps=2, guidance=10.0, seed=8
    )
    assert max_abs_diff(_pixels(result)[0], _pixels(unprocessed)[0]) > 1  # the depth map, not the photo, was used


# -- a Control LoRA on a base model --------------------------------------------------------------


def control_lora_expected(models, control_lora, control, *, seed: int, style: tuple[Path, float] | None = None, **call):
    """FluxControlPipeline on the base folder with the Control LoRA loaded (diffusers widens x_embedder)."""
    import diffusers

    pipe = diffusers.FluxControlPipeline.from_pretrained(str(models["base"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(control_lora), adapter_name="canny")
    if style is not None:
        pipe.load_lora_weights(str(style[0]), adapter_name="style")
        pipe.set_adapters(["canny", "style"], adapter_weights=[1.0, style[1]])
    return pipe(prompt=PROMPT, control_image=control, generator=_generator(seed), **call).images


def test_a_control_lora_makes_the_base_model_a_control_model(lora_cluster, models, control_lora):
    from fluxmesh.v1 import common_pb2 as common
    from fluxmesh.v1 import generator_pb2_grpc

    with grpc.insecure_channel(lora_cluster.address) as channel:
        info = generator_pb2_grpc.GeneratorStub(channel).Info(common.InfoRequest(), timeout=30)
    assert [stage.control for stage in info.stages if stage.stage == "denoiser"] == [True]
    photo = _images(13, (80, 64))[0]
    result = _generate(
        lora_cluster.address, [_reference(CONTROL, photo, preprocess=CANNY)], width=80, height=64, steps=3,
        guidance=10.0, seed=6, num_images=2,
    )  # fmt: skip
    expected = control_lora_expected(
        models, control_lora, canny_as_controlnet_aux(photo), seed=6, width=80, height=64, num_inference_steps=3,
        guidance_scale=10.0, num_images_per_prompt=2,
    )  # fmt: skip
    assert _all_within_one(result, expected)
    error = _refused(lora_cluster.address, [], width=64, height=64, steps=1)  # a Control model needs its image
    assert error.code() == INVALID and error.details().startswith("references:")


def test_a_lora_stacks_on_the_control_lora(lora_cluster, models, control_lora, style_lora):
    control = _images(14, (64, 64))[0]
    options = dict(width=64, height=64, steps=2, guidance=10.0, seed=8)
    result = _generate(
        lora_cluster.address,
        [_reference(CONTROL, control)],
        loras=[common_pb2.LoraWeight(name="style", weight=0.8)],
        **options,
    )
    call = dict(width=64, height=64, num_inference_steps=2, guidance_scale=10.0)
    expected = control_lora_expected(models, control_lora, control, seed=8, style=(style_lora, 0.8), **call)
    assert _all_within_one(result, expected)
    plain = control_lora_expected(models, control_lora, control, seed=8, **call)
    assert max_abs_diff(_pixels(result)[0], plain[0]) > 1  # the style LoRA shows


# -- bad input -----------------------------------------------------------------------------------


def _bad_kontext_edits():
    init, mask = init_and_mask(64, 64)
    reference = _reference(KONTEXT, _images(0, (64, 64))[0], keep_size=True)
    return [
        ("init-without-mask", [reference], _edit(init), "mask_image"),
        ("other-size", [reference], _edit(init, mask, width=80, height=64), "width"),
        ("strength-zero", [reference], _edit(init, mask, strength=0.0), "strength"),
        ("strength-above-one", [reference], _edit(init, mask, strength=1.5), "strength"),
        ("mask-of-another-size", [reference], _edit(init, init_and_mask(64, 48)[1]), "mask_image"),
        ("mask-without-init", [reference], {"mask_image": _png(mask)}, "mask_image"),
        ("init-too-small", [reference], _edit(*init_and_mask(8, 64)), "init_image"),
    ]


@pytest.mark.parametrize(
    "references,fields,field", [case[1:] for case in _bad_kontext_edits()], ids=[c[0] for c in _bad_kontext_edits()]
)
def test_bad_kontext_edits_are_named_before_any_stage_works(kontext_cluster, references, fields, field):
    before = _stage_requests(kontext_cluster)
    error = _refused(kontext_cluster.address, references, steps=2, **fields)
    assert error.code() == INVALID and error.details().startswith(f"{field}:"), (error.code(), error.details())
    assert _stage_requests(kontext_cluster) == before


def test_bad_control_edits_are_named_and_the_service_keeps_serving(control_cluster):
    init, mask = init_and_mask(64, 64)
    control = [_reference(CONTROL, _images(0, (64, 64))[0])]
    before = _stage_requests(control_cluster)
    for fields, field in (
        (_edit(init, strength=float("nan")), "strength"),
        (_edit(init, mask, negative_prompt="x", true_cfg_scale=2.0), "negative_prompt"),
        (_edit(init, init_and_mask(48, 64)[1]), "mask_image"),
        ({"strength": 0.5}, "strength"),  # strength without an init image
    ):
        error = _refused(control_cluster.address, control, steps=2, **fields)
        assert error.code() == INVALID and error.details().startswith(f"{field}:"), (error.code(), error.details())
    assert _stage_requests(control_cluster) == before
    assert len(_generate(control_cluster.address, control, **_edit(init, mask), steps=2).images) == 1


def test_the_denoiser_wants_a_mask_with_kontext_and_an_init_image(kontext_cluster):
    """A stage driven by something else than the orchestrator still names the field."""
    import torch

    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.v1 import denoiser_pb2, denoiser_pb2_grpc

    denoiser = next(child.address for child in kontext_cluster.children if child.name == "denoiser")
    request = bare_denoise_request(
        width=64,
        height=64,
        steps=2,
        seed=0,
        num_images=1,
        init=denoiser_pb2.InitImage(posterior=to_pb(torch.zeros(1, 32, 8, 8)), strength=0.5),
    )
    request.conditioning.kontext_latents.CopyFrom(to_pb(torch.zeros(1, 16, 8, 8)))
    with grpc.insecure_channel(denoiser) as channel, pytest.raises(grpc.RpcError) as caught:
        list(
            denoiser_pb2_grpc.DenoiserStub(channel).Denoise(
                request, timeout=30, metadata=stage_metadata(kontext_cluster.stage_token)
            )
        )
    assert caught.value.code() == INVALID and caught.value.details().startswith("init.mask:")


# -- the work budget counts Kontext's reference tokens -------------------------------------------


def test_a_kontext_reference_counts_against_the_work_budget():
    from fluxmesh import contract
    from fluxmesh.orchestrator.references import Capabilities
    from fluxmesh.orchestrator.request import ModelFacts, check_request
    from fluxmesh.rpc.errors import InvalidArgument

    assert contract.request_work(64, 64, 1, 10, reference_pixels=64 * 64) == 2 * contract.request_work(64, 64, 1, 10)
    facts = ModelFacts(capabilities=Capabilities(kontext=True))
    limits = contract.LIMITS.lowered(max_work=1.5 * contract.request_work(512, 512, 1, 20))
    plain = generator_pb2.GenerateRequest(prompt=PROMPT, width=512, height=512, steps=20, seed=1)
    asyncio.run(check_request(plain, facts, limits))  # within the budget alone
    edit = generator_pb2.GenerateRequest()
    edit.CopyFrom(plain)
    edit.references.append(_reference(KONTEXT, Image.new("RGB", (512, 512)), keep_size=True))
    with pytest.raises(InvalidArgument) as caught:  # twice the tokens: over it
        asyncio.run(check_request(edit, facts, limits))
    assert caught.value.field == "work" and "0.25 MP of Kontext reference tokens" in str(caught.value)


# -- sequential mode (last: it leaves the stages released; each test loads them back) -----------


def test_sequential_mode_keeps_kontext_control_edit_and_control_lora_pixels(
    kontext_cluster, control_cluster, lora_cluster
):
    """The Control LoRA's widened x_embedder is made again when the released denoiser loads."""
    init, mask = init_and_mask(64, 64, seed=11)
    image = _images(12, (64, 64))[0]
    for cluster, references in (
        (kontext_cluster, [_reference(KONTEXT, image, keep_size=True)]),
        (control_cluster, [_reference(CONTROL, image, preprocess=DEPTH)]),  # the depth model reloads too
        (lora_cluster, [_reference(CONTROL, image, preprocess=CANNY)]),
    ):
        options = dict(_edit(init, mask, strength=0.9), steps=3, guidance=3.0, seed=5)
        resident = _generate(cluster.address, references, **options)
        sequential, stages = _sequential_orchestrator(cluster)
        try:
            result = _generate(sequential.address, references, **options)
        finally:
            sequential.stop()
            _load_all(stages, cluster.stage_token)
        assert [i.data for i in result.images] == [i.data for i in resident.images]
        assert result.timings.swaps == 4  # encoder and vae at once, denoiser, vae: as inpainting
