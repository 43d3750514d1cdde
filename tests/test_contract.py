"""The request contract: one table of limits and rules that every process applies the same way."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits, Phase, PreviewKind, ReleaseTo, StartResidency, WeightState
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import generator_pb2


@pytest.mark.parametrize("value", [48, 65, 2064, 0, -64])
def test_a_side_is_a_multiple_within_the_bounds_and_the_message_shows_it(value):
    with pytest.raises(InvalidArgument) as caught:
        contract.check_side("width", value, 16)
    assert caught.value.field == "width"
    assert caught.value.message == f"width: {value} must be a multiple of 16 within [64, 2048]"


def test_sides_at_the_bounds_pass():
    for value in (64, 2048, 1024):
        contract.check_side("height", value, 16)


def test_lowered_limits_apply_and_cannot_be_raised():
    small = LIMITS.lowered(max_side=512, max_steps=10)
    assert small == Limits(max_side=512, max_steps=10)
    contract.check_side("width", 1024, 16)  # the defaults are untouched
    with pytest.raises(InvalidArgument, match=r"width: 1024 must be a multiple of 16 within \[64, 512\]"):
        contract.check_side("width", 1024, 16, small)
    with pytest.raises(InvalidArgument, match=r"steps: 11 is outside \[1, 10\]"):
        contract.check_steps(11, small)
    with pytest.raises(InvalidArgument, match="max_side: 4096"):
        LIMITS.lowered(max_side=4096)
    with pytest.raises(InvalidArgument, match="min_side"):
        LIMITS.lowered(min_side=16)


def test_steps_after_strength_is_diffusers_arithmetic():
    # FluxImg2ImgPipeline.get_timesteps: int(steps * strength)-based, in float arithmetic
    assert contract.steps_after_strength(28, 0.6) == 17
    assert contract.steps_after_strength(5, 0.8) == 4
    assert contract.steps_after_strength(4, 0.1) == 1  # int() truncates: a small strength still runs one
    assert contract.steps_after_strength(1, 1e-300) == 0  # 1 - 1e-300 rounds to 1.0
    with pytest.raises(InvalidArgument, match=r"init.strength: 1e-300 leaves no step of 1"):
        contract.check_strength_leaves_a_step(1e-300, 1, "init.strength")
    for bad in (0.0, 1.5, math.nan):
        with pytest.raises(InvalidArgument, match="strength"):
            contract.check_strength(bad)


def test_sequence_length_zero_means_the_default_only_where_asked():
    contract.check_sequence_length("max_sequence_length", 0, zero_is_default=True)
    with pytest.raises(InvalidArgument, match=r"prompt_embeds.shape: 0 is outside \[1, 512\]"):
        contract.check_sequence_length("prompt_embeds.shape", 0)
    with pytest.raises(InvalidArgument, match="max_sequence_length: 513"):
        contract.check_sequence_length("max_sequence_length", 513, zero_is_default=True)


def test_loras_weights_and_duplicates():
    assert contract.check_loras([("a", 1), ("b", -4.0)]) == (("a", 1.0), ("b", -4.0))
    for loras, field in (
        ([("a", 4.5)], "loras[0].weight"),
        ([("a", True)], "loras[0].weight"),
        ([("", 1.0)], "loras[0].name"),
        ([("a", 1.0), ("a", 0.5)], "loras[1].name"),
        ([("a",)], "loras[0]"),
    ):
        with pytest.raises(InvalidArgument) as caught:
            contract.check_loras(loras)
        assert caught.value.field == field


def test_float_dtypes_by_wire_name_or_torch_name():
    contract.check_float_dtype("latents.dtype", "torch.bfloat16")
    contract.check_float_dtype("latents.dtype", "float32")
    with pytest.raises(InvalidArgument, match="latents.dtype: uint8 is not a float dtype"):
        contract.check_float_dtype("latents.dtype", "torch.uint8")


def test_preview_kinds_and_phases_round_trip_through_the_proto_enums():
    for kind in PreviewKind:
        assert PreviewKind.from_pb(kind.pb) is kind
    assert PreviewKind.from_pb(generator_pb2.PREVIEW_KIND_UNSPECIFIED) is None
    with pytest.raises(InvalidArgument, match="preview.kind: 7"):
        PreviewKind.from_pb(7)
    with pytest.raises(InvalidArgument, match="preview: 'slow'"):
        PreviewKind.parse("slow")
    assert [Phase.from_pb(p.pb) for p in Phase] == list(Phase)
    assert [p.stage for p in Phase] == list(contract.Stage)


def test_the_auto_release_rule_is_one_rule():
    assert ReleaseTo.auto.on("cpu") is ReleaseTo.disk and ReleaseTo.auto.on("cuda:1") is ReleaseTo.cpu
    assert ReleaseTo.cpu.on("cpu") is ReleaseTo.cpu
    assert ReleaseTo.auto.state("cpu") is WeightState.released and ReleaseTo.auto.state("mps") is WeightState.offloaded
    assert StartResidency.standby.state("cpu") is WeightState.released
    assert StartResidency.standby.state("cuda:0") is WeightState.offloaded
    assert StartResidency.for_release(ReleaseTo.auto) is StartResidency.standby
    assert StartResidency.for_release(ReleaseTo.cpu) is StartResidency.offloaded
    assert StartResidency.for_release(ReleaseTo.disk) is StartResidency.released


def test_the_contract_imports_without_torch():
    code = "import sys, fluxmesh.contract; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
