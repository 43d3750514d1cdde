"""`fluxmesh plan` counts the FLUX.1 family's extra weights and tokens: a Redux folder's SigLIP
and image embedder on the encoder (equal to what the loaded encoder reports), its image tokens and
a Kontext reference's tokens in the denoiser's sequence."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    from fluxmesh.services.tools.tiny_model import write_tiny_model

    root = tmp_path_factory.mktemp("family-plan")
    return {variant: write_tiny_model(root / variant, variant=variant) for variant in ("base", "kontext", "redux")}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_redux_weights_from_headers_equal_the_loaded_encoder(family, dtype):
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.tools.planning import make_plan

    plan = make_plan(family["base"], vram=2**30, width=64, height=64, dtype=dtype, redux=family["redux"])
    encoder = next(s for s in plan.stages if s.stage == "encoder")
    loaded = TextEncoderEngine(family["base"], Device.parse("cpu", dtype), redux=family["redux"]).weight_bytes()
    assert encoder.weight_bytes == loaded
    without = make_plan(family["base"], vram=2**30, width=64, height=64, dtype=dtype)
    assert encoder.weight_bytes > next(s for s in without.stages if s.stage == "encoder").weight_bytes
    assert any("Redux" in source for source in encoder.sources)


def test_extra_tokens_raise_the_denoiser_activations(family):
    from fluxmesh.services.tools.planning import make_plan

    def denoiser(folder, **options):
        plan = make_plan(folder, vram=2**30, width=64, height=64, **options)
        return next(s for s in plan.stages if s.stage == "denoiser").activation_bytes

    plain = denoiser(family["base"])
    assert denoiser(family["base"], redux=family["redux"]) > plain  # 16 image tokens more
    assert denoiser(family["kontext"]) > denoiser(family["base"], redux=family["redux"])  # up to 4096 reference tokens


def test_plan_refuses_a_folder_that_is_not_redux(family):
    from fluxmesh.rpc.errors import NotFound
    from fluxmesh.services.tools.planning import make_plan

    with pytest.raises(NotFound, match="not a FLUX.1-Redux folder"):
        make_plan(family["base"], vram=2**30, width=64, height=64, redux=family["kontext"])
