"""GGUF files and community LoRAs through the four real processes, against diffusers' own paths.

The oracles: `FluxPipeline` with the GGUF transformer loaded by diffusers' GGUF quantizer,
with T5 loaded by transformers from the same GGUF file, and `load_lora_weights` +
`set_adapters` with the same LoRA files and weights.
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from factories import PROMPT, max_abs_diff
from fluxmesh.cli.supervisor import free_port
from fluxmesh.client import Client, FluxmeshError
from lora_fixtures import FORMATS, bfl_to_comfy, write_garbage, write_lora
from mesh import Mesh

SIZE, STEPS, GUIDANCE, SEED = 64, 4, 3.5, 7
STACK = [("a", 0.8), ("b", 0.5)]


@pytest.fixture(scope="module")
def files(dev_model, tmp_path_factory) -> dict[str, Path]:
    from fluxmesh.services.gguf import quantize_t5, quantize_transformer

    root = tmp_path_factory.mktemp("community")
    loras = root / "loras"
    for fmt in FORMATS:
        write_lora(fmt, loras / fmt / "a.safetensors", dev_model, seed=1)
        write_lora(fmt, loras / fmt / "b.safetensors", dev_model, seed=2)
    write_garbage(loras / "broken.safetensors")
    comfy = root / "comfy"  # diffusers ignores BFL lora_A names; its oracle reads the same LoRA in ComfyUI naming
    for n in ("a", "b"):
        bfl_to_comfy(loras / "bfl" / f"{n}.safetensors", comfy / f"{n}.safetensors")
    return {
        "loras": loras,
        "comfy": comfy,
        "q8_bfl": quantize_transformer(dev_model, root / "flux-Q8_0.gguf", "Q8_0", "bfl"),
        "q8_diffusers": quantize_transformer(dev_model, root / "flux-Q8_0-diffusers.gguf", "Q8_0", "diffusers"),
        "t5_q8": quantize_t5(dev_model, root / "t5-Q8_0.gguf", "Q8_0"),
    }


def _cluster(model: Path, **stage_args: list[str]) -> Mesh:
    return Mesh(model, extra_args=stage_args).start_all()


@pytest.fixture(scope="module")
def lora_cluster(dev_model, files):
    lora = ["--lora-dir", str(files["loras"])]
    with _cluster(dev_model, encoder=lora, denoiser=lora) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def gguf_cluster(dev_model, files):
    lora = ["--lora-dir", str(files["loras"])]
    with _cluster(
        dev_model,
        encoder=["--t5-gguf", str(files["t5_q8"]), *lora],
        denoiser=["--transformer-gguf", str(files["q8_bfl"]), *lora],
    ) as cluster:
        yield cluster


def _split(cluster, loras=()):
    with Client(cluster.address, timeout=120) as client:
        return client.generate(
            PROMPT, width=SIZE, height=SIZE, steps=STEPS, guidance=GUIDANCE, seed=SEED, loras=list(loras)
        ).image


def _pipeline(model: Path, *, transformer_gguf: Path | None = None, t5_gguf: Path | None = None):
    from diffusers import FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig
    from transformers import T5Config, T5EncoderModel

    parts = {}
    if transformer_gguf is not None:  # diffusers' own GGUF path
        parts["transformer"] = FluxTransformer2DModel.from_single_file(
            str(transformer_gguf),
            config=str(model),
            subfolder="transformer",
            local_files_only=True,
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32),
            torch_dtype=torch.float32,
        )
    if t5_gguf is not None:  # transformers' own GGUF path
        folder = model / "text_encoder_2"
        parts["text_encoder_2"] = T5EncoderModel.from_pretrained(
            folder, gguf_file=str(t5_gguf), config=T5Config.from_pretrained(folder), local_files_only=True
        )
    pipe = FluxPipeline.from_pretrained(model, local_files_only=True, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, lora_files: list[tuple[Path, float]] = ()):
    names = [f"ref{i}" for i in range(len(lora_files))]
    for name, (path, _) in zip(names, lora_files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=[w for _, w in lora_files])
    return pipe(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        generator=torch.Generator("cpu").manual_seed(SEED),
    ).images[0]


def _oracle_files(files, fmt):
    folder = files["comfy"] if fmt == "bfl" else files["loras"] / fmt
    return [(folder / f"{n}.safetensors", w) for n, w in STACK]


@pytest.mark.parametrize("fmt", FORMATS)
def test_lora_stack_matches_diffusers(lora_cluster, dev_model, files, fmt):
    got = _split(lora_cluster, [(f"{fmt}/{n}", w) for n, w in STACK])
    want = _reference(_pipeline(dev_model), _oracle_files(files, fmt))
    assert max_abs_diff(got, want) <= 1
    base = _reference(_pipeline(dev_model))
    assert max_abs_diff(got, base) > 5  # the LoRAs really changed the picture


def test_no_loras_right_after_loras_is_the_base_image_exactly(lora_cluster, dev_model):
    with_loras = _split(lora_cluster, [("kohya/a", 0.8), ("peft/b", 0.5)])
    without = _split(lora_cluster)
    base = _reference(_pipeline(dev_model))
    assert max_abs_diff(without, base) == 0
    assert max_abs_diff(with_loras, base) > 5


def test_lora_errors_are_precise_and_the_service_keeps_serving(lora_cluster):
    cases = [
        ([("nope", 1.0)], grpc.StatusCode.NOT_FOUND, "loras[0].name"),
        ([("../escape", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "loras[0].name"),
        ([("/etc/passwd", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "loras[0].name"),
        ([("broken", 1.0)], grpc.StatusCode.INVALID_ARGUMENT, "broken"),
        ([("kohya/a", 4.5)], grpc.StatusCode.INVALID_ARGUMENT, "loras[0].weight"),
        ([("kohya/a", float("nan"))], grpc.StatusCode.INVALID_ARGUMENT, "loras[0].weight"),
        ([("kohya/a", 1.0), ("kohya/a", 0.5)], grpc.StatusCode.INVALID_ARGUMENT, "loras[1].name"),
    ]
    for loras, code, named in cases:
        with pytest.raises(FluxmeshError) as caught:
            _split(lora_cluster, loras)
        assert caught.value.code == code, (loras, caught.value)
        assert named in caught.value.message, (loras, caught.value.message)
    assert _split(lora_cluster, [("xlabs/a", 1.0)]).size == (SIZE, SIZE)


def test_list_loras(lora_cluster):
    with Client(lora_cluster.address) as client:
        listed = {lora.name: lora for lora in client.list_loras()}
    assert {f"{fmt}/{n}" for fmt in FORMATS for n in ("a", "b")} <= set(listed)
    assert listed["kohya/a"].size_bytes > 0


def test_stage_without_lora_dir_refuses_loras(dev_cluster):
    with Client(dev_cluster.address, timeout=30) as client:
        with pytest.raises(FluxmeshError) as caught:
            client.generate(PROMPT, width=SIZE, height=SIZE, steps=1, loras=[("kohya/a", 1.0)])
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "--lora-dir" in caught.value.message


def test_gguf_transformer_and_t5_match_diffusers_and_transformers(gguf_cluster, dev_model, files):
    got = _split(gguf_cluster)
    want = _reference(_pipeline(dev_model, transformer_gguf=files["q8_diffusers"], t5_gguf=files["t5_q8"]))
    assert max_abs_diff(got, want) <= 1


def test_gguf_q8_stays_close_to_the_unquantized_image(gguf_cluster, dev_cluster):
    quantized = np.asarray(_split(gguf_cluster), dtype=np.float64)
    full = np.asarray(_split(dev_cluster), dtype=np.float64)
    psnr = 10 * np.log10(255**2 / max(np.mean((quantized - full) ** 2), 1e-12))
    # Measured 66.3 dB on the tiny model (Q8_0 transformer + Q8_0 T5); a different seed gives ~14 dB,
    # 5% weight noise ~43 dB. 50 dB leaves room for CPU kernels while still catching a broken quantizer.
    assert psnr >= 50, psnr


def test_loras_on_a_gguf_base_match_diffusers(gguf_cluster, dev_model, files):
    got = _split(gguf_cluster, [(f"kohya/{n}", w) for n, w in STACK])
    want = _reference(
        _pipeline(dev_model, transformer_gguf=files["q8_diffusers"], t5_gguf=files["t5_q8"]),
        _oracle_files(files, "kohya"),
    )
    assert max_abs_diff(got, want) <= 1
    assert (
        max_abs_diff(
            _split(gguf_cluster),
            _reference(_pipeline(dev_model, transformer_gguf=files["q8_diffusers"], t5_gguf=files["t5_q8"])),
        )
        <= 1
    )


def test_both_gguf_namings_give_the_same_image(dev_model, files, gguf_cluster):
    with _cluster(
        dev_model,
        encoder=["--t5-gguf", str(files["t5_q8"])],
        denoiser=["--transformer-gguf", str(files["q8_diffusers"])],
    ) as cluster:
        diffusers_named = _split(cluster)
    assert max_abs_diff(diffusers_named, _split(gguf_cluster)) == 0


def test_bad_gguf_file_fails_at_start_naming_it(dev_model, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    import subprocess
    import sys

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fluxmesh.cli",
            "serve",
            "denoiser",
            "--model",
            str(dev_model),
            "--port",
            str(free_port()),
            "--transformer-gguf",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    (said,) = [line for line in done.stderr.splitlines() if " INFO " not in line]  # one line (a server logs its start)
    assert said.startswith("error: FAILED_PRECONDITION: ") and str(bad) in said


def test_quantize_command_writes_a_loadable_file(dev_model, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "q4.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "fluxmesh.cli", "quantize", str(dev_model), str(out), "-t", "Q4_0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    from fluxmesh.services.gguf import load_gguf_transformer

    model = load_gguf_transformer(out, dev_model)
    assert model.config.guidance_embeds
    bad = subprocess.run(
        [sys.executable, "-m", "fluxmesh.cli", "quantize", str(tmp_path / "missing"), str(out)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "missing" in bad.stderr
