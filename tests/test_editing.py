"""Image to image, inpainting and FLUX.1-Fill through the real four processes equal diffusers'
FluxImg2ImgPipeline / FluxInpaintPipeline / FluxFillPipeline (<= 1 per 8-bit channel), and bad
edit inputs get INVALID_ARGUMENT naming the field before any stage works."""

from __future__ import annotations

import io
import math

import grpc
import numpy as np
import pytest
from PIL import Image

from conftest import stage_metadata
from factories import PROMPT, edit_reference_images, init_and_mask, max_abs_diff
from fluxmesh.client import Client, FluxmeshError


def _png(image: Image.Image, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format)
    return buffer.getvalue()


def _generate(cluster, **options):
    with Client(cluster.address, timeout=120) as client:
        return client.generate(PROMPT, **options)


@pytest.mark.parametrize(
    "width,height,strength,num_images",
    [
        pytest.param(96, 64, 0.7, 2, id="resized-0.7-x2"),
        pytest.param(64, 64, 1.0, 1, id="square-1.0"),
    ],
)
def test_image_to_image_matches_flux_img2img_pipeline(dev_cluster, dev_model, width, height, strength, num_images):
    init, _ = init_and_mask()  # 112x80: resized to width x height, as the pipeline does
    result = _generate(
        dev_cluster,
        width=width,
        height=height,
        steps=4,
        guidance=3.5,
        seed=5,
        num_images=num_images,
        init_image=init,
        strength=strength,
    )
    expected = edit_reference_images(
        dev_model,
        init=init,
        strength=strength,
        width=width,
        height=height,
        steps=4,
        guidance=3.5,
        seed=5,
        num_images=num_images,
    )
    assert [image.size for image in result.images] == [(width, height)] * num_images
    assert max(max_abs_diff(got, want) for got, want in zip(result.images, expected)) <= 1


def test_inpainting_matches_flux_inpaint_pipeline(dev_cluster, dev_model):
    init, mask = init_and_mask(seed=1)
    # The mask as a JPEG, the init image as PNG bytes: both formats go the same way.
    result = _generate(
        dev_cluster,
        width=96,
        height=64,
        steps=5,
        guidance=3.5,
        seed=9,
        num_images=2,
        init_image=_png(init),
        mask_image=_png(mask, "JPEG"),
        strength=0.8,
    )
    jpeg_mask = Image.open(io.BytesIO(_png(mask, "JPEG")))
    expected = edit_reference_images(
        dev_model,
        init=init,
        mask=jpeg_mask,
        strength=0.8,
        width=96,
        height=64,
        steps=5,
        guidance=3.5,
        seed=9,
        num_images=2,
    )
    assert max(max_abs_diff(got, want) for got, want in zip(result.images, expected)) <= 1
    # Guard the oracle: the mask changes the result (the same request without it is image to image).
    unmasked = _generate(dev_cluster, width=96, height=64, steps=5, guidance=3.5, seed=9, init_image=init, strength=0.8)
    assert max_abs_diff(result.images[0], unmasked.image) > 10


def test_schnell_image_to_image_matches(schnell_cluster, schnell_model):
    init, _ = init_and_mask(seed=2)
    result = _generate(
        schnell_cluster, width=64, height=64, steps=3, guidance=0.0, seed=3, init_image=init, strength=0.5
    )
    expected = edit_reference_images(
        schnell_model, init=init, strength=0.5, width=64, height=64, steps=3, guidance=0.0, seed=3
    )
    assert max_abs_diff(result.image, expected[0]) <= 1


def test_size_defaults_to_the_init_image(dev_cluster, dev_model):
    init, _ = init_and_mask(width=104, height=72)  # rounded down to the model's multiple of 16
    result = _generate(dev_cluster, steps=2, guidance=3.5, seed=4, init_image=init, strength=0.6)
    assert (result.width, result.height) == (96, 64) and result.image.size == (96, 64)
    expected = edit_reference_images(
        dev_model, init=init, strength=0.6, width=96, height=64, steps=2, guidance=3.5, seed=4
    )
    assert max_abs_diff(result.image, expected[0]) <= 1


def test_strength_cuts_the_steps_and_different_seeds_differ(dev_cluster):
    init, _ = init_and_mask()
    with Client(dev_cluster.address, timeout=120) as client:
        events = list(client.stream(PROMPT, width=64, height=64, steps=10, seed=1, init_image=init, strength=0.3))
        other = client.generate(PROMPT, width=64, height=64, steps=10, seed=2, init_image=init, strength=0.3)
    steps = [(e.step, e.total) for e in events if type(e).__name__ == "Step"]
    assert steps == [(i, 3) for i in range(1, 4)]  # FluxImg2ImgPipeline runs the last int(10 * 0.3) steps
    assert max_abs_diff(events[-1].image, other.image) > 10


# -- FLUX.1-Fill ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fill_model(tmp_path_factory):
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-fill", fill=True)


@pytest.fixture(scope="module")
def fill_cluster(fill_model):
    from mesh import Mesh

    with Mesh(fill_model).start_all() as cluster:
        yield cluster


def test_fill_model_matches_flux_fill_pipeline(fill_cluster, fill_model):
    init, mask = init_and_mask(seed=3)
    result = _generate(
        fill_cluster,
        width=96,
        height=64,
        steps=4,
        guidance=30.0,
        seed=8,
        num_images=2,
        init_image=init,
        mask_image=mask,
    )  # strength: Fill's default, 1.0
    expected = edit_reference_images(
        fill_model,
        init=init,
        mask=mask,
        strength=1.0,
        width=96,
        height=64,
        steps=4,
        guidance=30.0,
        seed=8,
        num_images=2,
    )
    assert max(max_abs_diff(got, want) for got, want in zip(result.images, expected)) <= 1
    partial = _generate(
        fill_cluster,
        width=64,
        height=64,
        steps=4,
        guidance=30.0,
        seed=8,
        init_image=init,
        mask_image=mask,
        strength=0.5,
    )
    expected = edit_reference_images(
        fill_model, init=init, mask=mask, strength=0.5, width=64, height=64, steps=4, guidance=30.0, seed=8
    )
    assert max_abs_diff(partial.image, expected[0]) <= 1


@pytest.mark.parametrize(
    "field,options",
    [
        ("init_image", {}),
        ("mask_image", {"init_image": init_and_mask()[0]}),
    ],
    ids=["no-init", "no-mask"],
)
def test_fill_model_needs_init_image_and_mask(fill_cluster, field, options):
    with pytest.raises(FluxmeshError) as caught:
        _generate(fill_cluster, width=64, height=64, steps=2, **options)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(f"{field}:"), caught.value.message


# -- bad input -----------------------------------------------------------------------------------


def _bad_inputs():
    init, mask = init_and_mask()
    colour = Image.fromarray(np.asarray(init)[:, :, [2, 0, 1]])  # a colour image used as a mask
    huge = Image.new("L", (4097, 16))
    return [
        ("strength", {"init_image": init, "strength": 0.0}),
        ("strength", {"init_image": init, "strength": 1.5}),
        ("strength", {"init_image": init, "strength": math.nan}),
        ("strength", {"init_image": init, "strength": 1e-20}),  # leaves no step to run
        ("strength", {"strength": 0.5}),  # without an init image
        ("mask_image", {"mask_image": mask}),  # without an init image
        ("mask_image", {"init_image": init, "mask_image": mask.resize((56, 40))}),
        ("mask_image", {"init_image": init, "mask_image": colour}),
        ("mask_image", {"init_image": init, "mask_image": b"not an image"}),
        ("init_image", {"init_image": b"\x89PNG\r\n\x1a\n truncated"}),
        ("init_image", {"init_image": _png(init, "GIF")}),
        ("init_image", {"init_image": _png(init, "BMP")}),
        ("init_image", {"init_image": huge}),
        ("init_image", {"init_image": _png(init)[:200]}),  # cut short
    ]


BAD = _bad_inputs()


def _work_done(address: str) -> dict[str, int]:
    with Client(address) as client:
        return {stage.stage: int(stage.details["requests"]) for stage in client.info().stages}


@pytest.mark.parametrize("field,options", BAD, ids=[f"{i}-{f}" for i, (f, _) in enumerate(BAD)])
def test_bad_edit_input_names_the_field_before_any_stage_runs(dev_cluster, field, options):
    before = _work_done(dev_cluster.address)
    with pytest.raises(FluxmeshError) as caught:
        _generate(dev_cluster, width=64, height=64, steps=2, **options)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith(f"{field}:"), caught.value.message
    assert _work_done(dev_cluster.address) == before
    assert _generate(dev_cluster, width=64, height=64, steps=1, seed=1).image.size == (64, 64)  # still serving


def test_gray_masks_in_any_one_channel_form_are_accepted(dev_cluster):
    init, mask = init_and_mask()
    as_rgba = mask.convert("RGBA")  # editors often save masks as RGB(A) gray
    with Client(dev_cluster.address, timeout=120) as client:
        a = client.generate(PROMPT, width=64, height=64, steps=2, seed=1, init_image=init, mask_image=mask)
        b = client.generate(PROMPT, width=64, height=64, steps=2, seed=1, init_image=init, mask_image=as_rgba)
    assert max_abs_diff(a.image, b.image) == 0


def test_vae_stage_checks_what_it_is_sent(stage_addresses, stage_token):
    """Encode called directly (not through the orchestrator) still answers INVALID_ARGUMENT."""
    from fluxmesh.rpc.channels import sync_channel
    from fluxmesh.v1 import vae_pb2, vae_pb2_grpc

    init, mask = init_and_mask()
    cases = [
        ("image", vae_pb2.EncodeImageRequest(image=b"junk", width=64, height=64)),
        ("mask", vae_pb2.EncodeImageRequest(image=_png(init), mask=_png(mask.resize((10, 10))), width=64, height=64)),
        ("width", vae_pb2.EncodeImageRequest(image=_png(init), width=65, height=64)),
    ]
    with sync_channel(stage_addresses["vae"]) as channel:
        stub = vae_pb2_grpc.VaeStub(channel)
        for field, request in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Encode(request, timeout=30, metadata=stage_metadata(stage_token))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert caught.value.details().startswith(f"{field}:"), caught.value.details()
        good = vae_pb2.EncodeImageRequest(image=_png(init), mask=_png(mask), width=64, height=64)
        reply = stub.Encode(good, timeout=30, metadata=stage_metadata(stage_token))
    assert list(reply.posterior.shape) == [1, 32, 8, 8] and list(reply.latents.shape) == [1, 16, 8, 8]
    assert list(reply.mask.shape) == [1, 1, 64, 64] and reply.mask.dtype == "uint8"
    assert abs(reply.scaling_factor - 0.3611) < 1e-6 and abs(reply.shift_factor - 0.1159) < 1e-6


def test_cli_generate_inpaints_and_writes_previews(dev_cluster, dev_model, tmp_path):
    import subprocess
    import sys

    init, mask = init_and_mask(seed=4)
    init.save(tmp_path / "init.png")
    mask.save(tmp_path / "mask.png")
    command = [
        sys.executable,
        "-m",
        "fluxmesh.cli",
        "generate",
        "--address",
        dev_cluster.address,
        "-p",
        PROMPT,
        "--init-image",
        str(tmp_path / "init.png"),
        "--mask",
        str(tmp_path / "mask.png"),
        "--strength",
        "0.8",
        "--width",
        "64",
        "--height",
        "64",
        "--steps",
        "5",
        "--seed",
        "6",
        "--preview",
        "fast",
        "--preview-every",
        "2",
        "--preview-dir",
        str(tmp_path / "previews"),
        "-o",
        str(tmp_path / "out.png"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    expected = edit_reference_images(
        dev_model, init=init, mask=mask, strength=0.8, width=64, height=64, steps=5, guidance=3.5, seed=6
    )
    assert max_abs_diff(Image.open(tmp_path / "out.png"), expected[0]) <= 1
    # strength 0.8 of 5 steps runs 4: previews at steps 2 and 4
    assert sorted(p.name for p in (tmp_path / "previews").iterdir()) == ["step-002.jpg", "step-004.jpg"]
    assert Image.open(tmp_path / "previews" / "step-004.jpg").size == (8, 8)
    bad = subprocess.run(
        [*command[:-2], "--strength", "2", "-o", str(tmp_path / "bad.png")], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "strength:" in bad.stderr and not (tmp_path / "bad.png").exists()


def test_a_fill_model_refuses_true_cfg(fill_cluster):
    """FluxFillPipeline has no true CFG: said before any stage runs, not ignored."""
    init, mask = init_and_mask(seed=3)
    with Client(fill_cluster.address, timeout=60) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(
                PROMPT,
                width=64,
                height=64,
                steps=2,
                init_image=init,
                mask_image=mask,
                negative_prompt="blurry",
                true_cfg_scale=2.0,
            )
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message.startswith("true_cfg_scale: FLUX.1-Fill")
