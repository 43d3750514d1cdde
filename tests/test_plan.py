"""`fluxmesh plan`: weights computed from file headers equal what the stages hold once loaded, the
FLUX.1-dev configs give FLUX.1-dev's published sizes, and the placements follow from the numbers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fluxmesh.services.tools.planning import GIB, make_plan, parse_size

FLUXMESH = [sys.executable, "-m", "fluxmesh.cli"]


@pytest.fixture(scope="module")
def dev_sized(tmp_path_factory):
    """FLUX.1-dev's real configs with sparse (empty) weight files: headers without data."""
    from fluxmesh.services.tools.full_size import write_full_size_model

    return write_full_size_model(tmp_path_factory.mktemp("models") / "dev-sized", weights="sparse")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_from_headers_equal_the_loaded_stages(dev_model, dtype):
    """Same bytes as the engines hold after from_pretrained in that dtype (float16 keeps T5's
    `wo` in float32, as transformers does), the numbers Info.weight_bytes reports."""
    from fluxmesh.services.denoiser.engine import DenoiserEngine
    from fluxmesh.services.encoder.engine import TextEncoderEngine
    from fluxmesh.services.runtime.device import Device
    from fluxmesh.services.vae.engine import VaeEngine

    plan = make_plan(dev_model, vram=GIB, width=64, height=64, dtype=dtype)
    device = Device.parse("cpu", dtype)
    loaded = {
        "encoder": TextEncoderEngine(dev_model, device).weight_bytes(),
        "denoiser": DenoiserEngine(dev_model, device).weight_bytes(),
        "vae": VaeEngine(dev_model, device).weight_bytes(),
    }
    assert {s.stage: s.weight_bytes for s in plan.stages} == loaded


def test_gguf_transformer_counts_as_loaded(dev_model, tmp_path):
    """Quantized tensors as stored, float tensors in the compute dtype: what diffusers' GGUF
    loading holds."""
    import torch

    from fluxmesh.services.gguf import load_gguf_transformer, quantize_transformer
    from fluxmesh.services.runtime.memory import module_bytes

    gguf_file = quantize_transformer(dev_model, tmp_path / "t-Q8_0.gguf", "Q8_0")
    plan = make_plan(dev_model, vram=GIB, width=64, height=64, dtype="bfloat16", transformer_gguf=gguf_file)
    denoiser = next(s for s in plan.stages if s.stage == "denoiser")
    assert denoiser.weight_bytes == module_bytes(load_gguf_transformer(gguf_file, dev_model, torch.bfloat16))
    assert "GGUF" in denoiser.sources[0]


def test_flux_dev_configs_give_the_published_sizes(dev_sized):
    plan = make_plan(dev_sized, vram=parse_size("16GiB"), width=1024, height=1024)
    weights = {s.stage: s.weight_bytes for s in plan.stages}
    # Parameter counts of FLUX.1-dev: transformer 11,901,408,320; T5-XXL encoder 4,762,310,656;
    # CLIP-L text 123,060,480 (+ its 77 int64 position ids); VAE 83,819,683. bf16: 2 bytes each.
    assert weights == {
        "encoder": 2 * (4_762_310_656 + 123_060_480) + 8 * 77,
        "denoiser": 2 * 11_901_408_320,
        "vae": 2 * 83_819_683,
    }


def test_placements_follow_from_the_numbers(dev_sized):
    """16 GiB: neither all-resident nor sequential fits a bf16 FLUX.1-dev transformer (22 GiB);
    sequential with a Q8_0 transformer does (~12.7 GB of weights), within the 14 GiB target."""
    plan = make_plan(dev_sized, vram=parse_size("16GiB"), width=1024, height=1024)
    fits = {layout.name: layout.fits for layout in plan.layouts}
    assert not fits["all stages resident on one accelerator"]
    assert not fits["sequential on one accelerator (--sequential)"]
    assert [q.name for q in plan.quantization] == ["sequential, transformer as Q8_0 GGUF"]
    q8 = plan.quantization[0]
    assert q8.fits and q8.accelerator_bytes <= 14 * GIB
    # More memory, more placements: 48 GiB holds everything resident; activations grow with size.
    roomy = make_plan(dev_sized, vram=parse_size("48GiB"), width=1024, height=1024)
    assert all(layout.fits for layout in roomy.layouts) and not roomy.quantization
    small = make_plan(dev_sized, vram=parse_size("48GiB"), width=512, height=512)
    assert all(a.activation_bytes < b.activation_bytes for a, b in zip(small.stages[1:], roomy.stages[1:]))


def test_plan_command_json_and_errors(dev_model):
    done = subprocess.run(
        [*FLUXMESH, "plan", "--model", str(dev_model), "--vram", "4GiB", "--width", "64", "--height", "64", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [s["stage"] for s in data["stages"]] == ["encoder", "denoiser", "vae"]
    assert all(layout["fits"] for layout in data["layouts"])  # a tiny model fits anything
    bad = subprocess.run(
        [*FLUXMESH, "plan", "--model", str(dev_model), "--vram", "lots"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "vram: 'lots'" in bad.stderr
    bad = subprocess.run(
        [*FLUXMESH, "plan", "--model", str(dev_model), "--width", "100"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "width: 100" in bad.stderr


@pytest.mark.parametrize(
    "text,expected",
    [("16GiB", 16 * GIB), ("16 GB", 16 * GIB), ("12.5G", int(12.5 * GIB)), ("800MiB", 800 * 2**20), ("1TiB", 2**40)],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_plan_refuses_the_gguf_files_the_stages_refuse(dev_model, schnell_model, tmp_path):
    """A GGUF made from another model: `plan` used to say "fits" for what `serve` then refused.
    Both now ask the same header check, and give the same reason."""
    import shutil

    import torch

    from fluxmesh.rpc.errors import FluxmeshError
    from fluxmesh.services.gguf import load_gguf_t5, load_gguf_transformer, quantize_t5, quantize_transformer

    other = shutil.copytree(dev_model, tmp_path / "other")  # the dev model with a wider T5 MLP
    config = json.loads((other / "text_encoder_2" / "config.json").read_text())
    config["d_ff"] *= 2
    (other / "text_encoder_2" / "config.json").write_text(json.dumps(config))
    schnell_transformer = quantize_transformer(schnell_model, tmp_path / "schnell.gguf", "Q8_0")
    dev_t5 = quantize_t5(dev_model, tmp_path / "t5.gguf", "Q8_0")

    def refusal(call) -> str | None:
        try:
            call()
        except FluxmeshError as error:
            return error.message
        return None

    for folder, kind, file, load in (
        (dev_model, "transformer_gguf", schnell_transformer, load_gguf_transformer),
        (schnell_model, "transformer_gguf", schnell_transformer, load_gguf_transformer),
        (other, "t5_gguf", dev_t5, load_gguf_t5),
        (dev_model, "t5_gguf", dev_t5, load_gguf_t5),
    ):
        served = refusal(lambda: load(file, folder, torch.float32))  # noqa: B023 - called at once
        planned = refusal(lambda: make_plan(folder, vram=GIB, width=64, height=64, **{kind: file}))  # noqa: B023
        assert planned == served, (folder.name, kind)
    assert "does not fit the model folder's transformer" in refusal(
        lambda: make_plan(dev_model, vram=GIB, width=64, height=64, transformer_gguf=schnell_transformer)
    )
    assert "the model folder's T5 has d_ff=" in refusal(
        lambda: make_plan(other, vram=GIB, width=64, height=64, t5_gguf=dev_t5)
    )
