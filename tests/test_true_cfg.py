"""True classifier-free guidance (FluxPipeline's `negative_prompt` + `true_cfg_scale`): the split
pipeline encodes the negative prompt too and the denoiser runs it at every step, with the same
pixels as diffusers; either half without the other is an error naming the missing field (diffusers
would ignore it silently)."""

from __future__ import annotations

import pytest

from factories import PROMPT, edit_reference_images, init_and_mask, max_abs_diff, reference_images
from fluxmesh.client import Client

NEGATIVE = "blurry, low quality, watermark"


@pytest.mark.parametrize(
    "negative,scale,num_images",
    [
        pytest.param(NEGATIVE, 4.0, 1, id="negative-1"),
        pytest.param(NEGATIVE, 2.5, 2, id="negative-2"),
        pytest.param("", 8.0, 1, id="empty-negative"),  # an empty negative prompt is a real one
    ],
)
def test_true_cfg_matches_flux_pipeline(dev_cluster, dev_model, negative, scale, num_images):
    with Client(dev_cluster.address, timeout=120) as client:
        result = client.generate(
            PROMPT,
            width=64,
            height=64,
            steps=3,
            guidance=3.5,
            seed=21,
            num_images=num_images,
            negative_prompt=negative,
            true_cfg_scale=scale,
        )
        plain = client.generate(PROMPT, width=64, height=64, steps=3, guidance=3.5, seed=21).image
    expected = reference_images(
        dev_model,
        width=64,
        height=64,
        steps=3,
        guidance=3.5,
        seed=21,
        num_images=num_images,
        negative_prompt=negative,
        true_cfg_scale=scale,
    )
    assert len(result.images) == num_images
    assert max(max_abs_diff(got, want) for got, want in zip(result.images, expected)) <= 1
    # Guards the oracle: with true CFG the image is not the plain one, by more than the tolerance above
    # (measured 4 to 11 on the tiny model, depending on the negative prompt and the scale).
    assert max_abs_diff(result.images[0], plain) > 1


@pytest.mark.parametrize("masked", [False, True], ids=["image-to-image", "inpainting"])
def test_true_cfg_on_edits_matches(dev_cluster, dev_model, masked):
    init, mask = init_and_mask(seed=4)
    mask = mask if masked else None
    with Client(dev_cluster.address, timeout=120) as client:
        result = client.generate(
            PROMPT,
            width=64,
            height=64,
            steps=4,
            guidance=3.5,
            seed=8,
            init_image=init,
            mask_image=mask,
            strength=0.75,
            negative_prompt=NEGATIVE,
            true_cfg_scale=3.0,
        )
    expected = edit_reference_images(
        dev_model,
        init=init,
        mask=mask,
        strength=0.75,
        width=64,
        height=64,
        steps=4,
        guidance=3.5,
        seed=8,
        negative_prompt=NEGATIVE,
        true_cfg_scale=3.0,
    )
    assert max_abs_diff(result.image, expected[0]) <= 1
