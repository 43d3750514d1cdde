"""Same folder, prompt, size, steps, guidance and seed -> the pixels diffusers.FluxPipeline makes."""

from __future__ import annotations

import pytest

from factories import PROMPT, max_abs_diff, reference_images
from fluxmesh.client import Client

CASES = [
    pytest.param(64, 64, 1, id="square-1"),
    pytest.param(96, 64, 1, id="wide-1"),
    pytest.param(64, 128, 2, id="tall-2"),
]


def _split_vs_diffusers(cluster, folder, width, height, num_images, *, steps, guidance, seed):
    with Client(cluster.address, timeout=120) as client:
        result = client.generate(
            PROMPT, width=width, height=height, steps=steps, guidance=guidance, seed=seed, num_images=num_images
        )
    expected = reference_images(
        folder, width=width, height=height, steps=steps, guidance=guidance, seed=seed, num_images=num_images
    )
    assert len(result.images) == num_images
    assert [image.size for image in result.images] == [(width, height)] * num_images
    return [max_abs_diff(got, want) for got, want in zip(result.images, expected)]


@pytest.mark.parametrize("width,height,num_images", CASES)
def test_dev_model_matches_flux_pipeline(dev_cluster, dev_model, width, height, num_images):
    diffs = _split_vs_diffusers(dev_cluster, dev_model, width, height, num_images, steps=4, guidance=3.5, seed=1234)
    assert max(diffs) <= 1, diffs


@pytest.mark.parametrize("width,height,num_images", CASES)
def test_schnell_model_matches_flux_pipeline(schnell_cluster, schnell_model, width, height, num_images):
    diffs = _split_vs_diffusers(
        schnell_cluster, schnell_model, width, height, num_images, steps=2, guidance=0.0, seed=7
    )
    assert max(diffs) <= 1, diffs


def test_different_seeds_give_different_images(dev_cluster):
    # Guards the oracle itself: if every seed gave the same picture, "equal" would prove nothing.
    with Client(dev_cluster.address, timeout=120) as client:
        a = client.generate(PROMPT, width=64, height=64, steps=2, seed=1).image
        b = client.generate(PROMPT, width=64, height=64, steps=2, seed=2).image
    assert max_abs_diff(a, b) > 10


def test_seed_is_chosen_and_returned_when_unset(dev_cluster, dev_model):
    with Client(dev_cluster.address, timeout=120) as client:
        result = client.generate(PROMPT, width=64, height=64, steps=2, guidance=3.5)
    assert result.seed > 0
    expected = reference_images(dev_model, width=64, height=64, steps=2, guidance=3.5, seed=result.seed)
    assert max_abs_diff(result.image, expected[0]) <= 1
