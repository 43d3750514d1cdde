"""`--compile` on the denoiser and the vae, through the four real processes: health says SERVING
only once the compiled model is warm, the pixels stay FluxPipeline's (within 1/255) at a warm-up
size and outside it, LoRA switches copy into the hot-swap slot without a single recompile, and
the metrics count the compiles and their seconds.

One compiled mesh for the module: compiling is the expensive part (minutes on 2 busy cores with
a cold inductor cache; its FX graph cache makes later runs on the same machine far cheaper)."""

from __future__ import annotations

import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from factories import PROMPT, reference_images
from fluxmesh.client import Client, FluxmeshError
from fluxmesh.rpc.channels import sync_channel
from fluxmesh.v1 import common_pb2
from lora_fixtures import write_lora
from mesh import NOT_SERVING, SERVING, Mesh, metric
from rpc_tools import call

COMPILED = ("denoiser", "vae")
SIZE = 64  # the warm-up size
STEPS = 4
WARM_UP_TIMEOUT = 1200.0  # a cold compile on a loaded 2-core machine

pytestmark = pytest.mark.timeout(1500)  # the module's first test waits for the warm-up


@pytest.fixture(scope="module")
def lora_dir(dev_model, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("compile-loras")
    write_lora("peft", root / "a.safetensors", dev_model, seed=1, alpha=8.0)
    write_lora("kohya", root / "b.safetensors", dev_model, seed=2)
    return root


@pytest.fixture(scope="module")
def compiled(dev_model, lora_dir, tmp_path_factory):
    """The mesh, and per compiled stage the health statuses it went through (None: not
    listening yet) and its Info details when it first said SERVING."""
    warm = ["--compile", "--warmup-sizes", f"{SIZE}x{SIZE}"]
    mesh = Mesh(
        dev_model,
        tmp_path_factory.mktemp("compile-logs"),
        extra_args={
            "denoiser": [*warm, "--max-batch", "2", "--lora-dir", str(lora_dir), "--max-lora-rank", "8"],
            "vae": warm,
            "encoder": ["--lora-dir", str(lora_dir)],  # the LoRA files' CLIP parts
        },
    )
    try:
        for name in (*COMPILED, "encoder", "orchestrator"):
            mesh.start(name)
        mesh.statuses = {name: [] for name in COMPILED}
        mesh.at_serving = {}
        started = time.monotonic()
        while len(mesh.at_serving) < len(COMPILED):
            assert time.monotonic() - started < WARM_UP_TIMEOUT, mesh.statuses
            for name in COMPILED:
                if name in mesh.at_serving:
                    continue
                assert mesh.process(name).poll() is None, mesh.log(name)[-3000:]
                status = mesh.health(name)
                if not mesh.statuses[name] or mesh.statuses[name][-1] != status:
                    mesh.statuses[name].append(status)
                if status == SERVING:
                    mesh.at_serving[name] = _info(mesh, name)
            time.sleep(0.1)
        mesh.warm_up_seconds = time.monotonic() - started
        mesh.wait_health(SERVING, timeout=120)
        yield mesh
    finally:
        mesh.stop()


def _info(mesh: Mesh, name: str) -> dict[str, str]:
    service = {"denoiser": "Denoiser", "vae": "Vae"}[name]
    with sync_channel(mesh.address_of(name)) as channel:
        _, _, [raw] = call(
            channel,
            f"/fluxmesh.v1.{service}/Info",
            common_pb2.InfoRequest(),
            timeout=10,
            metadata=mesh.stage_metadata(),
        )
    return dict(common_pb2.StageInfo.FromString(raw).details)


def _pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def _generate(mesh: Mesh, width: int = SIZE, height: int = SIZE, loras=()):
    with Client(mesh.address, timeout=300) as client:
        return client.generate(
            PROMPT, width=width, height=height, steps=STEPS, guidance=3.5, seed=11, loras=list(loras)
        ).image


def _lora_reference(dev_model: Path, lora_dir: Path, name: str, weight: float):
    """FluxPipeline with the LoRA loaded its own way: the oracle."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(dev_model, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(lora_dir / f"{name}.safetensors"), adapter_name="ref")
    pipe.set_adapters(["ref"], adapter_weights=[weight])
    return pipe(
        PROMPT,
        width=SIZE,
        height=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(11),
    ).images[0]


def test_serving_only_after_warm_up(compiled):
    print(f"\ncompiled stages warm after {compiled.warm_up_seconds:.0f} s: {compiled.at_serving}")
    for name in COMPILED:
        # None: no answer within the probe's second (not listening yet, or compiling holds the GIL)
        answered = [s for s in compiled.statuses[name] if s is not None]
        changes = [s for i, s in enumerate(answered) if i == 0 or answered[i - 1] != s]
        assert changes == [NOT_SERVING, SERVING], (name, compiled.statuses[name])
        details = compiled.at_serving[name]
        # compiled before it said SERVING, and nothing since
        assert int(details["compiles"]) >= 1 and float(details["compile_seconds"]) > 0, (name, details)
        assert int(details["recompiles"]) == 0, (name, details)
        text = compiled.metrics(name)
        assert metric(text, "fluxmesh_compile_seconds_total", stage=name) > 0, name
        assert metric(text, "fluxmesh_compiles_total", stage=name) >= 1, name


@pytest.mark.parametrize("width,height", [(SIZE, SIZE), (96, 80)], ids=["warm-up size", "outside warm-up"])
def test_compiled_pixels_are_diffusers(compiled, dev_model, width, height):
    expected = reference_images(dev_model, width=width, height=height, steps=STEPS, guidance=3.5, seed=11)[0]
    started = time.monotonic()
    assert np.abs(_pixels(_generate(compiled, width, height)) - _pixels(expected)).max() <= 1
    # what a size costs (docs/benchmarks.md): recompiles so far, and this request's seconds
    recompiles = {name: _info(compiled, name)["recompiles"] for name in COMPILED}
    print(f"\n{width}x{height}: {time.monotonic() - started:.1f} s, recompiles so far {recompiles}")


def test_lora_switches_do_not_recompile(compiled, dev_model, lora_dir):
    before = {name: metric(compiled.metrics(name), "fluxmesh_recompiles_total", stage=name) for name in COMPILED}
    base = _pixels(_generate(compiled))
    for name, weight in (("a", 1.0), ("b", 0.7), ("a", -0.5)):
        image = _generate(compiled, loras=[(name, weight)])
        expected = _lora_reference(dev_model, lora_dir, name, weight)
        assert np.abs(_pixels(image) - _pixels(expected)).max() <= 1, (name, weight)
    assert np.array_equal(_pixels(_generate(compiled)), base)  # the emptied slot is the base model
    after = {name: metric(compiled.metrics(name), "fluxmesh_recompiles_total", stage=name) for name in COMPILED}
    assert after == before
    assert _info(compiled, "denoiser")["recompiles"] == str(int(before["denoiser"]))


def test_a_stack_of_loras_is_refused_by_name(compiled):
    with pytest.raises(FluxmeshError) as caught:
        _generate(compiled, loras=[("a", 1.0), ("b", 1.0)])
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "loras" in str(caught.value) and "one LoRA at a time" in str(caught.value)
