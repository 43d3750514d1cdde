"""The rest of the FLUX.1 family through the four real processes: Redux image prompts (encoder
--redux), Kontext references and Control images equal FluxPriorReduxPipeline + FluxPipeline,
FluxKontextPipeline and FluxControlPipeline on the same tiny folders, inputs and seed (<= 1 per
8-bit channel), in resident and in sequential mode; every bad combination is refused naming the
field before any stage works, and the service keeps serving."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import stage_metadata
from factories import PROMPT, bare_denoise_request, init_and_mask, max_abs_diff, png_image, within_one
from fluxmesh.v1 import common_pb2, generator_pb2, generator_pb2_grpc, residency_pb2, residency_pb2_grpc
from mesh import Mesh

KONTEXT, CONTROL, REDUX = (
    generator_pb2.REFERENCE_ROLE_KONTEXT,
    generator_pb2.REFERENCE_ROLE_CONTROL,
    generator_pb2.REFERENCE_ROLE_REDUX,
)
CANNY = common_pb2.CONTROL_PREPROCESS_CANNY


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _images(seed: int, *sizes: tuple[int, int]) -> list[Image.Image]:
    return [init_and_mask(width=w, height=h, seed=seed + i)[0] for i, (w, h) in enumerate(sizes)]


def _reference(role: int, image: Image.Image, **fields) -> generator_pb2.Reference:
    return generator_pb2.Reference(role=role, image=_png(image), **fields)


def _generate(
    address: str, references, *, prompt: str = PROMPT, timeout: float = 300, **fields
) -> generator_pb2.Result:
    request = generator_pb2.GenerateRequest(prompt=prompt, references=references, **fields)
    with grpc.insecure_channel(address) as channel:
        for event in generator_pb2_grpc.GeneratorStub(channel).Generate(request, timeout=timeout):
            if event.HasField("result"):
                return event.result
    raise AssertionError("no result")


def _pixels(result: generator_pb2.Result) -> list[Image.Image]:
    return [png_image(image.data) for image in result.images]


def _refused(address: str, references, **fields) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        _generate(address, references, **fields)
    return caught.value


# -- models and clusters -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("family")
    return {variant: write_tiny_model(root / variant, variant=variant) for variant in ("kontext", "control", "redux")}


def _cluster(model: Path, **stage_args) -> Mesh:
    return Mesh(model, extra_args=stage_args).start_all()


def _sequential_orchestrator(cluster: Mesh) -> tuple[Mesh, dict[str, str]]:
    """A second orchestrator, in sequential mode, over the same three stage processes."""
    stages = {child.name: child.address for child in cluster.children if child.name != "orchestrator"}
    sequential = Mesh(stages=stages, stage_token=cluster.stage_token, extra_args={"orchestrator": ["--sequential"]})
    return sequential.start_all(timeout=120), stages


@pytest.fixture(scope="module")
def lora_dir(models, tmp_path_factory) -> Path:
    from lora_fixtures import write_lora

    root = tmp_path_factory.mktemp("family-loras")
    write_lora("kohya", root / "style.safetensors", models["kontext"], seed=3)  # transformer and CLIP keys
    return root


@pytest.fixture(scope="module")
def kontext_cluster(models, lora_dir):
    """The Kontext model (FLUX.1-dev-shaped) with a Redux folder on the encoder, and LoRAs."""
    loras = ["--lora-dir", str(lora_dir)]
    with _cluster(models["kontext"], encoder=["--redux", str(models["redux"]), *loras], denoiser=loras) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def control_cluster(models):
    with _cluster(models["control"]) as cluster:
        yield cluster


# -- the oracles ---------------------------------------------------------------------------------


@cache
def _pipeline(cls_name: str, folder: str):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generator(seed: int):
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def redux_expected(
    models, images, scales, pooled_scales, *, prompt: str | None, seed: int, **call
) -> list[Image.Image]:
    """FluxPriorReduxPipeline (with the model's text encoders, or with zero text embeddings when
    there is no prompt) then FluxPipeline, as diffusers' Redux example does."""
    import torch

    base = _pipeline("FluxPipeline", str(models["kontext"]))
    prior = _pipeline("FluxPriorReduxPipeline", str(models["redux"]))
    prior.text_encoder, prior.tokenizer = base.text_encoder, base.tokenizer
    prior.text_encoder_2, prior.tokenizer_2 = base.text_encoder_2, base.tokenizer_2
    if prompt is None:  # what the prior does without text encoders, at this model's widths
        text = {
            "prompt_embeds": torch.zeros(len(images), 512, 32),
            "pooled_prompt_embeds": torch.zeros(len(images), 32),
        }
    else:
        text = {"prompt": prompt}
    prior_output = prior(image=images, prompt_embeds_scale=scales, pooled_prompt_embeds_scale=pooled_scales, **text)
    return base(
        prompt_embeds=prior_output.prompt_embeds,
        pooled_prompt_embeds=prior_output.pooled_prompt_embeds,
        generator=_generator(seed),
        **call,
    ).images


def kontext_expected(models, image, *, seed: int, keep_size: bool, width: int, height: int, **call):
    pipe = _pipeline("FluxKontextPipeline", str(models["kontext"]))
    return pipe(
        image=image,
        prompt=PROMPT,
        width=width,
        height=height,
        max_area=width * height,
        _auto_resize=not keep_size,
        generator=_generator(seed),
        **call,
    ).images


def control_expected(models, control_image, *, seed: int, **call):
    pipe = _pipeline("FluxControlPipeline", str(models["control"]))
    return pipe(prompt=PROMPT, control_image=control_image, generator=_generator(seed), **call).images


def canny_as_controlnet_aux(image: Image.Image) -> Image.Image:
    """controlnet_aux.CannyDetector's map at the image's own size: cv2.Canny(100, 200), HWC3."""
    import cv2

    edges = cv2.Canny(np.asarray(image), 100, 200)
    return Image.fromarray(np.stack([edges] * 3, axis=-1))


# -- Redux ---------------------------------------------------------------------------------------


def test_redux_two_images_with_a_prompt_match_the_prior_and_flux_pipeline(kontext_cluster, models):
    images = _images(3, (56, 40), (48, 64))
    result = _generate(
        kontext_cluster.address,
        [_reference(REDUX, images[0], scale=0.8, pooled_scale=0.6), _reference(REDUX, images[1])],
        width=80,
        height=64,
        steps=3,
        guidance=3.5,
        seed=11,
        num_images=2,
    )
    expected = redux_expected(
        models,
        images,
        [0.8, 1.0],
        [0.6, 1.0],
        prompt=PROMPT,
        seed=11,
        width=80,
        height=64,
        num_inference_steps=3,
        guidance_scale=3.5,
        num_images_per_prompt=2,
    )
    got = _pixels(result)
    assert len(got) == 2 and within_one(got, expected)
    # Guards the oracle: the image prompt changes the picture.
    plain = _generate(kontext_cluster.address, [], width=80, height=64, steps=3, guidance=3.5, seed=11)
    assert max_abs_diff(got[0], _pixels(plain)[0]) > 1


def test_redux_without_a_prompt_is_the_prior_without_text_encoders(kontext_cluster, models):
    images = _images(5, (40, 40))
    result = _generate(
        kontext_cluster.address,
        [_reference(REDUX, images[0], scale=1.2)],
        prompt="",
        width=64,
        height=64,
        steps=2,
        guidance=3.5,
        seed=2,
    )
    expected = redux_expected(
        models,
        images,
        [1.2],
        [1.0],
        prompt=None,
        seed=2,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=3.5,
    )
    assert max_abs_diff(_pixels(result)[0], expected[0]) <= 1


def test_redux_truncation_is_reported_against_the_t5_part(kontext_cluster):
    long_prompt = " ".join([PROMPT] * 80)  # far over 512 T5 tokens
    result = _generate(
        kontext_cluster.address,
        [_reference(REDUX, _images(6, (40, 40))[0])],
        prompt=long_prompt,
        width=64,
        height=64,
        steps=1,
        seed=1,
    )
    assert len(result.warnings) == 1 and "beyond max_sequence_length 512 were dropped" in result.warnings[0]


# -- Kontext -------------------------------------------------------------------------------------


def test_kontext_keeping_the_reference_size_matches_flux_kontext_pipeline(kontext_cluster, models):
    reference = _images(7, (104, 72))[0]  # rounded down to 96x64; the output takes that size by default
    result = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, reference, keep_size=True)],
        steps=3,
        guidance=2.5,
        seed=4,
        num_images=2,
    )
    assert (result.width, result.height) == (96, 64)
    expected = kontext_expected(
        models,
        reference,
        seed=4,
        keep_size=True,
        width=96,
        height=64,
        num_inference_steps=3,
        guidance_scale=2.5,
        num_images_per_prompt=2,
    )
    got = _pixels(result)
    assert len(got) == 2 and within_one(got, expected)


def test_kontext_snaps_the_reference_to_a_preferred_resolution(kontext_cluster, models):
    """A 50x30 reference (aspect 1.67) is encoded at 1328x800, Kontext's nearest trained size."""
    reference = _images(8, (50, 30))[0]
    result = _generate(
        kontext_cluster.address, [_reference(KONTEXT, reference)], width=64, height=64, steps=2, guidance=2.5, seed=6
    )
    expected = kontext_expected(
        models, reference, seed=6, keep_size=False, width=64, height=64, num_inference_steps=2, guidance_scale=2.5
    )
    assert max_abs_diff(_pixels(result)[0], expected[0]) <= 1
    # Guards the oracle: the reference's tokens (4150 of them here, beside 16 image tokens) change
    # the picture. A same-size reference barely does on this random tiny model (<= 1 measured).
    plain = _generate(kontext_cluster.address, [], width=64, height=64, steps=2, guidance=2.5, seed=6)
    assert max_abs_diff(_pixels(result)[0], _pixels(plain)[0]) > 1


def test_kontext_with_true_cfg_matches(kontext_cluster, models):
    reference = _images(9, (64, 64))[0]
    result = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, reference, keep_size=True)],
        steps=2,
        guidance=2.5,
        seed=3,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
    )
    expected = kontext_expected(
        models,
        reference,
        seed=3,
        keep_size=True,
        width=64,
        height=64,
        num_inference_steps=2,
        guidance_scale=2.5,
        negative_prompt="blurry",
        true_cfg_scale=3.0,
    )
    assert max_abs_diff(_pixels(result)[0], expected[0]) <= 1


def test_kontext_with_a_lora_stacked_matches(kontext_cluster, models, lora_dir):
    """A kohya LoRA (transformer and CLIP keys) on top of Kontext, as FluxKontextPipeline.load_lora_weights."""
    import diffusers

    reference = _images(11, (64, 64))[0]
    result = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, reference, keep_size=True)],
        steps=2,
        guidance=2.5,
        seed=12,
        loras=[common_pb2.LoraWeight(name="style", weight=0.8)],
    )
    pipe = diffusers.FluxKontextPipeline.from_pretrained(str(models["kontext"]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir / "style.safetensors"), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.8])
    expected = pipe(
        image=reference,
        prompt=PROMPT,
        width=64,
        height=64,
        max_area=64 * 64,
        _auto_resize=False,
        num_inference_steps=2,
        guidance_scale=2.5,
        generator=_generator(12),
    ).images
    assert max_abs_diff(_pixels(result)[0], expected[0]) <= 1
    plain = kontext_expected(
        models, reference, seed=12, keep_size=True, width=64, height=64, num_inference_steps=2, guidance_scale=2.5
    )
    assert max_abs_diff(_pixels(result)[0], plain[0]) > 1  # the LoRA shows


# -- Control -------------------------------------------------------------------------------------


def test_control_image_matches_flux_control_pipeline(control_cluster, models):
    control = _images(10, (80, 56))[0]  # resized to the output size, as the pipeline does
    result = _generate(
        control_cluster.address,
        [_reference(CONTROL, control)],
        width=80,
        height=64,
        steps=3,
        guidance=10.0,
        seed=5,
        num_images=2,
    )
    expected = control_expected(
        models,
        control,
        seed=5,
        width=80,
        height=64,
        num_inference_steps=3,
        guidance_scale=10.0,
        num_images_per_prompt=2,
    )
    got = _pixels(result)
    assert len(got) == 2 and within_one(got, expected)


def test_server_side_canny_equals_controlnet_aux_canny_then_the_pipeline(control_cluster, models):
    photo = _images(12, (96, 64))[0]
    result = _generate(
        control_cluster.address,
        [_reference(CONTROL, photo, preprocess=CANNY)],
        width=96,
        height=64,
        steps=2,
        guidance=10.0,
        seed=8,
    )
    expected = control_expected(
        models, canny_as_controlnet_aux(photo), seed=8, width=96, height=64, num_inference_steps=2, guidance_scale=10.0
    )
    assert max_abs_diff(_pixels(result)[0], expected[0]) <= 1
    unprocessed = _generate(
        control_cluster.address, [_reference(CONTROL, photo)], width=96, height=64, steps=2, guidance=10.0, seed=8
    )
    assert max_abs_diff(_pixels(result)[0], _pixels(unprocessed)[0]) > 1  # the edges, not the photo, were used


# -- bad input -----------------------------------------------------------------------------------


def _stage_requests(cluster) -> dict[str, str]:
    from fluxmesh.v1 import common_pb2 as common
    from fluxmesh.v1 import denoiser_pb2_grpc, encoder_pb2_grpc, vae_pb2_grpc

    stubs = {
        "encoder": encoder_pb2_grpc.TextEncoderStub,
        "denoiser": denoiser_pb2_grpc.DenoiserStub,
        "vae": vae_pb2_grpc.VaeStub,
    }
    counts = {}
    for child in cluster.children:
        if child.name in stubs:
            with grpc.insecure_channel(child.address) as channel:
                counts[child.name] = (
                    stubs[child.name](channel)
                    .Info(common.InfoRequest(), timeout=10, metadata=stage_metadata(cluster.stage_token))
                    .details["requests"]
                )
    return counts


INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION


def _bad_on_kontext_cluster():
    image = _images(0, (64, 64))[0]
    init, _ = init_and_mask()
    return [
        ("unspecified-role", [_reference(0, image)], {}, INVALID, "references[0].role"),
        (
            "ip-adapter",
            [_reference(generator_pb2.REFERENCE_ROLE_IP_ADAPTER, image)],
            {},
            PRECONDITION,
            "references[0].role",
        ),
        (
            "controlnet",
            [_reference(generator_pb2.REFERENCE_ROLE_CONTROLNET, image)],
            {},
            PRECONDITION,
            "references[0].role",
        ),
        ("control-on-kontext-model", [_reference(CONTROL, image)], {}, PRECONDITION, "references[0].role"),
        ("two-kontext", [_reference(KONTEXT, image), _reference(KONTEXT, image)], {}, INVALID, "references[1].role"),
        ("kontext-with-init-no-mask", [_reference(KONTEXT, image)], {"init_image": _png(init)}, INVALID, "mask_image"),
        ("kontext-scale", [_reference(KONTEXT, image, scale=0.5)], {}, INVALID, "references[0].scale"),
        ("kontext-preprocess", [_reference(KONTEXT, image, preprocess=CANNY)], {}, INVALID, "references[0].preprocess"),
        (
            "kontext-too-small",
            [_reference(KONTEXT, _images(0, (8, 64))[0], keep_size=True)],
            {},
            INVALID,
            "references[0].image",
        ),
        ("redux-keep-size", [_reference(REDUX, image, keep_size=True)], {}, INVALID, "references[0].keep_size"),
        ("redux-negative-scale", [_reference(REDUX, image, scale=-0.5)], {}, INVALID, "references[0].scale"),
        (
            "redux-nan-pooled",
            [_reference(REDUX, image, pooled_scale=float("nan"))],
            {},
            INVALID,
            "references[0].pooled_scale",
        ),
        ("redux-scale-too-big", [_reference(REDUX, image, scale=4.5)], {}, INVALID, "references[0].scale"),
        ("redux-five-images", [_reference(REDUX, image)] * 5, {}, INVALID, "references[4].role"),
        (
            "redux-negative-prompt",
            [_reference(REDUX, image)],
            {"negative_prompt": "x", "true_cfg_scale": 2.0},
            INVALID,
            "negative_prompt",
        ),
        (
            "redux-sequence-length",
            [_reference(REDUX, image)],
            {"max_sequence_length": 256},
            INVALID,
            "max_sequence_length",
        ),
        (
            "controlnet-fields",
            [_reference(REDUX, image, control_start=0.1)],
            {},
            INVALID,
            "references[0].control_start",
        ),
        (
            "not-an-image",
            [generator_pb2.Reference(role=KONTEXT, image=b"GIF89a....")],
            {},
            INVALID,
            "references[0].image",
        ),
        ("empty-prompt-without-redux", [_reference(KONTEXT, image)], {"prompt": ""}, INVALID, "prompt"),
    ]


@pytest.mark.parametrize(
    "references,fields,code,field",
    [case[1:] for case in _bad_on_kontext_cluster()],
    ids=[case[0] for case in _bad_on_kontext_cluster()],
)
def test_bad_references_are_named_before_any_stage_works(kontext_cluster, references, fields, code, field):
    before = _stage_requests(kontext_cluster)
    error = _refused(kontext_cluster.address, references, width=64, height=64, steps=2, **fields)
    assert error.code() == code and error.details().startswith(f"{field}:"), (error.code(), error.details())
    assert _stage_requests(kontext_cluster) == before


def test_a_control_model_needs_its_control_image_and_lacks_redux_and_kontext(control_cluster):
    image = _images(0, (64, 64))[0]
    for references, code, field in (
        ([], INVALID, "references"),
        ([_reference(CONTROL, image), _reference(REDUX, image)], PRECONDITION, "references[1].role"),
        ([_reference(KONTEXT, image)], PRECONDITION, "references[0].role"),
        (
            [_reference(CONTROL, image, preprocess=common_pb2.CONTROL_PREPROCESS_DEPTH)],
            PRECONDITION,
            "references[0].preprocess",
        ),
        ([_reference(CONTROL, image)], INVALID, "negative_prompt"),
    ):
        fields = {"negative_prompt": "x", "true_cfg_scale": 2.0} if field == "negative_prompt" else {}
        error = _refused(control_cluster.address, references, width=64, height=64, steps=2, **fields)
        assert error.code() == code and error.details().startswith(f"{field}:"), (error.code(), error.details())
    # ... and keeps serving
    assert (
        len(_generate(control_cluster.address, [_reference(CONTROL, image)], width=64, height=64, steps=1).images) == 1
    )


def test_stages_check_what_they_are_sent(kontext_cluster):
    """A stage driven by something else than the orchestrator still names the field."""
    import torch

    from fluxmesh.services.runtime.tensors import to_pb
    from fluxmesh.v1 import denoiser_pb2_grpc, encoder_pb2, encoder_pb2_grpc

    stages = {child.name: child.address for child in kontext_cluster.children}
    credential = stage_metadata(kontext_cluster.stage_token)
    with grpc.insecure_channel(stages["encoder"]) as channel:
        stub = encoder_pb2_grpc.TextEncoderStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Encode(
                encoder_pb2.EncodeRequest(
                    prompts=["a"],
                    image_prompts=[
                        encoder_pb2.ImagePrompt(image=_png(_images(0, (32, 32))[0]), scale=9.0, pooled_scale=1.0)
                    ],
                ),
                timeout=30,
                metadata=credential,
            )
        assert caught.value.details().startswith("image_prompts[0].scale:")
    with grpc.insecure_channel(stages["denoiser"]) as channel:
        stub = denoiser_pb2_grpc.DenoiserStub(channel)
        request = bare_denoise_request(
            width=64,
            height=64,
            steps=1,
            seed=0,
            num_images=1,
        )
        request.conditioning.kontext_latents.CopyFrom(to_pb(torch.zeros(1, 16, 3, 8)))  # odd height
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Denoise(request, timeout=30, metadata=credential))
        assert caught.value.details().startswith("conditioning.kontext_latents.shape:")
        request.conditioning.Clear()
        request.conditioning.control_posterior.CopyFrom(to_pb(torch.zeros(1, 32, 8, 8)))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Denoise(request, timeout=30, metadata=credential))
        assert caught.value.details().startswith("conditioning.control_posterior:")  # not a Control model


# -- sequential mode (last: it leaves the stages released; each test loads them back) -----------


def _load_all(stages: dict[str, str], token: str) -> None:
    for address in stages.values():
        with grpc.insecure_channel(address) as channel:
            residency_pb2_grpc.ResidencyStub(channel).Load(
                residency_pb2.LoadRequest(), timeout=60, metadata=stage_metadata(token)
            )


def test_sequential_mode_keeps_redux_and_kontext_pixels(kontext_cluster):
    images = _images(14, (64, 64), (64, 48))
    references = [_reference(KONTEXT, images[0], keep_size=True), _reference(REDUX, images[1], scale=0.7)]
    options = dict(steps=2, guidance=2.5, seed=9)
    resident = _generate(kontext_cluster.address, references, **options)
    sequential, stages = _sequential_orchestrator(kontext_cluster)
    try:
        result = _generate(sequential.address, references, **options)
        again = _generate(sequential.address, references, **options)
    finally:
        sequential.stop()
        _load_all(stages, kontext_cluster.stage_token)
    assert [i.data for i in result.images] == [i.data for i in resident.images] == [i.data for i in again.images]
    # encoder, vae (the reference, at the same time as the prompt), denoiser, vae (decode): as image to image
    assert result.timings.swaps == 4
    # the same image prompts again: the prompt cache answers (the images are part of its key), no encoder turn
    assert again.timings.cached_encodes == 1 and again.timings.swaps == 2


def test_sequential_mode_keeps_control_pixels(control_cluster):
    control = _images(15, (64, 64))[0]
    references = [_reference(CONTROL, control, preprocess=CANNY)]
    resident = _generate(control_cluster.address, references, width=64, height=64, steps=2, seed=1)
    sequential, stages = _sequential_orchestrator(control_cluster)
    try:
        result = _generate(sequential.address, references, width=64, height=64, steps=2, seed=1)
    finally:
        sequential.stop()
        _load_all(stages, control_cluster.stage_token)
    assert [i.data for i in result.images] == [i.data for i in resident.images]


# -- SDK and CLI ---------------------------------------------------------------------------------


def test_sdk_and_cli_send_the_same_references(kontext_cluster, control_cluster, tmp_path):
    """Client.generate(references=[Reference(...)]) and `fluxmesh generate --reference/--image-prompt/
    --control/--control-type` build the requests the raw tests above prove against diffusers."""
    import subprocess
    import sys

    from fluxmesh.client import Client, Reference

    photo, prompt_image = _images(16, (64, 64), (48, 48))
    photo_path, prompt_path = tmp_path / "photo.png", tmp_path / "prompt.png"
    photo.save(photo_path)
    prompt_image.save(prompt_path)
    options = dict(steps=2, guidance=2.5, seed=3)
    raw = _generate(
        kontext_cluster.address,
        [_reference(KONTEXT, photo, keep_size=True), _reference(REDUX, prompt_image, scale=0.7)],
        **options,
    )
    with Client(kontext_cluster.address, timeout=300) as client:
        sdk = client.generate(
            PROMPT,
            references=[Reference("kontext", photo, keep_size=True), Reference("redux", prompt_path, scale=0.7)],
            **options,
        )
    assert sdk.image_data == [image.data for image in raw.images]
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "generate",
            "-p",
            PROMPT,
            "--address",
            kontext_cluster.address,
            "--steps",
            "2",
            "--guidance",
            "2.5",
            "--seed",
            "3",
            "--reference",
            str(photo_path),
            "--keep-size",
            "--image-prompt",
            f"{prompt_path}:0.7",
            "-o",
            str(tmp_path / "kontext.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "kontext.png").read_bytes() == raw.images[0].data

    raw = _generate(control_cluster.address, [_reference(CONTROL, photo, preprocess=CANNY)], steps=2, seed=3)
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "generate",
            "-p",
            PROMPT,
            "--address",
            control_cluster.address,
            "--steps",
            "2",
            "--seed",
            "3",
            "--control",
            str(photo_path),
            "--control-type",
            "canny",
            "-o",
            str(tmp_path / "control.png"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "control.png").read_bytes() == raw.images[0].data
    with pytest.raises(ValueError, match="references.role"):  # named before any call
        Reference("depth-anything", photo)
