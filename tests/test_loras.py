"""LoRAs: fluxmesh's library + activation against diffusers' own LoRA loading, on the tiny model.

The oracle is `FluxPipeline.load_lora_weights(file, adapter_name=n)` + `pipe.set_adapters(...)`
on a fresh pipeline; fluxmesh's side is one long-lived pipeline whose transformer and CLIP text
encoder are switched by `LoraActivator`, as the denoiser and encoder services do per request.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fluxmesh.rpc.errors import InvalidArgument, NotFound
from fluxmesh.services.loras import LoraActivator, LoraLibrary, check_lora_weight
from lora_fixtures import (
    FORMATS,
    Dims,
    bfl_to_comfy,
    write_garbage,
    write_kohya_lora,
    write_lora,
    write_not_a_lora,
    write_peft_lora,
    write_truncated,
)

# PEFT warns on every second adapter in a model ("multiple adapters"): that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")

PROMPT = "a photo of a cat sitting on a windowsill"
STACK = ((0.8, "a"), (0.5, "b"))  # a@0.8 + b@0.5


@pytest.fixture(autouse=True)
def _quiet_libraries():
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()


def _pipeline(model: Path, transformer=None):
    from diffusers import FluxPipeline

    kwargs = {"transformer": transformer} if transformer is not None else {}
    pipe = FluxPipeline.from_pretrained(model, local_files_only=True, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _image(pipe) -> np.ndarray:
    out = pipe(
        PROMPT,
        height=64,
        width=64,
        num_inference_steps=4,
        guidance_scale=3.5,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="np",
    ).images[0]
    return (out * 255).round().astype(np.int16)  # the uint8 pixels PIL output would hold


def _max_diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a - b).max())


def _reference(model: Path, files: list[tuple[Path, float]], transformer=None) -> np.ndarray:
    pipe = _pipeline(model, transformer)
    names = [f"ref{i}" for i in range(len(files))]
    for name, (path, _) in zip(names, files):
        pipe.load_lora_weights(str(path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[w for _, w in files])
    return _image(pipe)


@pytest.fixture(scope="module")
def lora_dir(dev_model, tmp_path_factory) -> Path:
    """Two LoRAs per naming, in subfolders (`kohya/a`, `kohya/b`, ...)."""
    root = tmp_path_factory.mktemp("loras")
    for fmt in FORMATS:
        extra = {"alpha": 8.0} if fmt == "peft" else {}  # PEFT alpha via lora_adapter_metadata
        write_lora(fmt, root / fmt / "a.safetensors", dev_model, seed=1, **extra)
        write_lora(fmt, root / fmt / "b.safetensors", dev_model, seed=2)
    return root


@pytest.fixture(scope="module")
def comfy_dir(lora_dir, tmp_path_factory) -> Path:
    """The BFL pair in ComfyUI naming: diffusers' oracle for BFL (see below)."""
    comfy = tmp_path_factory.mktemp("comfy")
    for n in ("a", "b"):
        bfl_to_comfy(lora_dir / "bfl" / f"{n}.safetensors", comfy / f"{n}.safetensors")
    return comfy


@pytest.fixture(scope="module")
def base_image(dev_model) -> np.ndarray:
    return _image(_pipeline(dev_model))


class Served:
    """One pipeline switched per request, like the stage services (denoiser + encoder CLIP)."""

    def __init__(self, model: Path, directory: Path, max_cached: int = 8, transformer=None):
        self.pipe = _pipeline(model, transformer)
        self.library = LoraLibrary(directory, max_cached=max_cached)
        self.transformer = LoraActivator(self.pipe.transformer, self.library)
        self.text_encoder = LoraActivator(self.pipe.text_encoder, self.library)

    def image(self, loras) -> np.ndarray:
        self.transformer.activate(loras)
        self.text_encoder.activate(loras)
        return _image(self.pipe)


@pytest.fixture(scope="module")
def served(dev_model, lora_dir) -> Served:
    return Served(dev_model, lora_dir)


# -- equivalence with diffusers ------------------------------------------------------------


@pytest.mark.parametrize("fmt", FORMATS)
def test_stack_matches_diffusers(fmt, served, dev_model, lora_dir, comfy_dir, base_image):
    image = served.image([(f"{fmt}/{n}", w) for w, n in STACK])
    # diffusers 0.42 does not read BFL names with lora_A/lora_B (it loads nothing); its oracle is
    # the same file in ComfyUI naming, which diffusers does convert. test_bfl_matches_merge
    # checks BFL against plain arithmetic as well.
    src = comfy_dir if fmt == "bfl" else lora_dir / fmt
    expected = _reference(dev_model, [(src / f"{n}.safetensors", w) for w, n in STACK])
    assert _max_diff(image, expected) <= 1
    assert np.abs(image - base_image).mean() > 4, "the LoRAs must visibly change the image"


def test_text_encoder_side(served, dev_model):
    """kohya `lora_te1_` and PEFT `text_encoder.` keys reach CLIP; XLabs/BFL carry none."""
    for fmt, has_clip in (("kohya", True), ("peft", True), ("xlabs", False), ("bfl", False)):
        active = served.text_encoder.activate([(f"{fmt}/a", 1.0)])
        assert [n for n, _ in active] == ([f"{fmt}/a"] if has_clip else [])
    served.text_encoder.activate([])


def test_no_loras_after_loras_is_base_exactly(served, base_image):
    served.image([("kohya/a", 0.8), ("peft/b", 0.5)])
    assert np.array_equal(served.image([]), base_image)


def test_bfl_matches_merge(dev_model, lora_dir):
    """BFL file at weight w == base with w * up @ down added to the mapped diffusers weights."""
    from safetensors.torch import load_file

    dims = Dims.of(dev_model)
    pipe = _pipeline(dev_model)
    params = dict(pipe.transformer.named_parameters())
    d = dims.inner
    targets = {}
    for i in range(dims.double):
        b = f"transformer_blocks.{i}"
        for s, attn, proj, ff, mod in (
            ("img", ("to_q", "to_k", "to_v"), "to_out.0", "ff", "norm1"),
            ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "ff_context", "norm1_context"),
        ):
            targets[f"double_blocks.{i}.{s}_attn.qkv"] = [f"{b}.attn.{m}" for m in attn]
            targets[f"double_blocks.{i}.{s}_attn.proj"] = [f"{b}.attn.{proj}"]
            targets[f"double_blocks.{i}.{s}_mlp.0"] = [f"{b}.{ff}.net.0.proj"]
            targets[f"double_blocks.{i}.{s}_mlp.2"] = [f"{b}.{ff}.net.2"]
            targets[f"double_blocks.{i}.{s}_mod.lin"] = [f"{b}.{mod}.linear"]
    for i in range(dims.single):
        targets[f"single_blocks.{i}.linear2"] = [f"single_transformer_blocks.{i}.proj_out"]
        targets[f"single_blocks.{i}.modulation.lin"] = [f"single_transformer_blocks.{i}.norm.linear"]
    with torch.no_grad():
        for w, n in STACK:
            sd = load_file(str(lora_dir / "bfl" / f"{n}.safetensors"))
            for module, dests in targets.items():
                key = f"diffusion_model.{module}"
                delta = w * (sd[f"{key}.lora_B.weight"] @ sd[f"{key}.lora_A.weight"])
                for dest, rows in zip(dests, delta.split(d, dim=0) if len(dests) == 3 else [delta]):
                    params[f"{dest}.weight"] += rows
    merged = _image(pipe)
    fresh = Served(dev_model, lora_dir)
    assert _max_diff(fresh.image([(f"bfl/{n}", w) for w, n in STACK]), merged) <= 1


def test_dev_lora_on_schnell_skips_the_guidance_layers(schnell_model, lora_dir):
    """A dev LoRA touching `guidance_embedder` still loads on schnell (which has none), as in diffusers."""
    served = Served(schnell_model, lora_dir)
    loras = [("peft/a", 0.8), ("kohya/b", 0.5)]
    image = served.image(loras)
    expected = _reference(schnell_model, [(lora_dir / f"{n}.safetensors", w) for n, w in loras])
    assert _max_diff(image, expected) <= 1
    assert not any("guidance" in n for n, _ in served.pipe.transformer.named_modules())


@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_alpha_scales_as_alpha_over_rank(fmt, dev_model, tmp_path):
    """alpha = rank/2 at weight 1.0 is the same LoRA as alpha = rank at weight 0.5."""
    writer = write_kohya_lora if fmt == "kohya" else write_peft_lora
    writer(tmp_path / "half.safetensors", dev_model, seed=5, rank=4, alpha=2.0)
    writer(tmp_path / "full.safetensors", dev_model, seed=5, rank=4, alpha=4.0)
    served = Served(dev_model, tmp_path)
    half = served.image([("half", 1.0)])
    assert _max_diff(half, served.image([("full", 0.5)])) <= 1
    assert _max_diff(half, served.image([("full", 1.0)])) > 8  # and alpha does matter


# -- switching, caching, eviction ----------------------------------------------------------


def test_switching_sets_reads_and_loads_each_lora_once(dev_model, lora_dir, monkeypatch):
    served = Served(dev_model, lora_dir)
    transformer = served.pipe.transformer
    loads = []
    original = transformer.load_lora_adapter

    def counting(*args, **kwargs):
        loads.append(kwargs["adapter_name"])
        return original(*args, **kwargs)

    monkeypatch.setattr(transformer, "load_lora_adapter", counting)

    def base_weights():  # by name as the base model calls them (PEFT moves them to `.base_layer`)
        return {n.replace(".base_layer", ""): p for n, p in transformer.named_parameters() if "lora_" not in n}

    first_set = [("kohya/a", 0.8), ("xlabs/b", 0.5)]
    first = served.image(first_set)
    before = {n: (p.data_ptr(), p.detach().clone()) for n, p in base_weights().items()}
    second = served.image([("peft/a", 1.0), ("kohya/a", -0.3)])
    served.image([])
    again = served.image(first_set)

    assert np.array_equal(first, again) and not np.array_equal(first, second)
    assert served.library.reads == 3  # kohya/a, xlabs/b, peft/a: each file read once
    assert len(loads) == 3  # and each loaded into the transformer once
    after = base_weights()
    assert after.keys() == before.keys()
    for name, (ptr, value) in before.items():
        assert after[name].data_ptr() == ptr and torch.equal(after[name], value), name


def test_lru_eviction_deletes_the_adapter(dev_model, tmp_path):
    from diffusers import FluxTransformer2DModel

    for i, n in enumerate("abc"):
        write_kohya_lora(tmp_path / f"{n}.safetensors", dev_model, seed=10 + i)
    library = LoraLibrary(tmp_path, max_cached=2, components=("transformer",))
    model = FluxTransformer2DModel.from_pretrained(dev_model, subfolder="transformer", local_files_only=True)
    activator = LoraActivator(model, library)

    def adapters_in_model() -> set[str]:
        return {k for m in model.modules() for k in getattr(m, "lora_A", {})}

    activator.activate([("a", 1.0)])
    activator.activate([("b", 1.0)])
    activator.activate([("a", 1.0)])  # a becomes the most recent
    assert library.reads == 2 and len(adapters_in_model()) == 2
    activator.activate([("c", 1.0)])  # evicts b, the least recently used
    assert library.cached() == ["a", "c"] and activator.loaded() == ["a", "c"]
    assert len(adapters_in_model()) == 2 and set(model.peft_config) == adapters_in_model()
    activator.activate([("b", 0.5), ("c", 0.5)])  # b is read again, a goes
    assert library.reads == 4 and library.cached() == ["b", "c"] and sorted(activator.loaded()) == ["b", "c"]
    with pytest.raises(InvalidArgument, match="at most 2"):
        activator.activate([("a", 1.0), ("b", 1.0), ("c", 1.0)])

    # A file replaced on disk is read again and its adapter rebuilt.
    write_kohya_lora(tmp_path / "c.safetensors", dev_model, seed=99)
    os.utime(tmp_path / "c.safetensors", ns=(1, 1))
    activator.activate([("c", 1.0)])
    assert library.reads == 5 and len(adapters_in_model()) == 2

    activator.close()
    assert adapters_in_model() == set()


def test_components_are_kept_per_service(dev_model, lora_dir):
    from transformers import CLIPTextModel

    denoiser = LoraLibrary(lora_dir, components=("transformer",))
    lora = denoiser.load("kohya/a")
    assert lora.has("transformer") and not lora.has("text_encoder")
    assert lora.components_in_file == {"transformer", "text_encoder"}
    text_encoder = CLIPTextModel.from_pretrained(dev_model, subfolder="text_encoder", local_files_only=True)
    with pytest.raises(ValueError, match="text_encoder"):
        LoraActivator(text_encoder, denoiser)


# -- names and errors ----------------------------------------------------------------------


def test_names_and_resolution(lora_dir, tmp_path):
    (tmp_path / "inner" / "deep").mkdir(parents=True)
    write_garbage(tmp_path / "inner" / "deep" / "x.safetensors")
    (tmp_path / "notes.txt").write_text("not a LoRA")
    outside = tmp_path.parent / f"{tmp_path.name}-outside.safetensors"
    write_garbage(outside)
    (tmp_path / "escape.safetensors").symlink_to(outside)
    (tmp_path / "alias.safetensors").symlink_to(tmp_path / "inner" / "deep" / "x.safetensors")

    library = LoraLibrary(tmp_path)
    assert library.names() == ["alias", "inner/deep/x"]
    assert library.resolve("inner/deep/x") == tmp_path / "inner" / "deep" / "x.safetensors"
    assert LoraLibrary(lora_dir).names() == [f"{fmt}/{n}" for fmt in sorted(FORMATS) for n in "ab"]

    for bad in ("../x", "inner/../../x", "/etc/passwd", "inner//deep/x", "./inner/deep/x", "escape", "a\\b", ""):
        with pytest.raises(InvalidArgument) as info:
            library.check([("inner/deep/x", 1.0), (bad, 1.0)])
        assert info.value.field == "loras[1].name"
    with pytest.raises(NotFound, match=r"loras\[0\].name.*'nope'"):
        library.check([("nope", 1.0)])


def test_odd_directory_entries_are_skipped_and_logged(lora_dir, tmp_path, caplog):
    """One odd entry must not break the listing for everyone (nor show a server path)."""
    import shutil

    shutil.copy(lora_dir / "kohya" / "a.safetensors", tmp_path / "good.safetensors")
    (tmp_path / "dangling.safetensors").symlink_to(tmp_path / "gone.safetensors")
    (tmp_path / "loop.safetensors").symlink_to(tmp_path / "loop.safetensors")
    shutil.copy(lora_dir / "kohya" / "a.safetensors", tmp_path / "back\\slash.safetensors")
    os.mkfifo(tmp_path / "fifo.safetensors")
    shutil.copy(lora_dir / "kohya" / "a.safetensors", os.fsencode(tmp_path) + b"/latin\xe9.safetensors")

    library = LoraLibrary(tmp_path)
    with caplog.at_level("WARNING", logger="fluxmesh.services.loras.library"):
        assert library.names() == ["good"]
        assert library.names() == ["good"]
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert len(skipped) == 5, skipped  # each odd entry logged once, not on every listing
    with pytest.raises(InvalidArgument, match="'loop' is a symlink loop") as info:
        library.check([("loop", 1.0)])
    assert str(tmp_path) not in info.value.message
    with pytest.raises(NotFound):
        library.check([("dangling", 1.0)])

    from fluxmesh.services.loras.stage import StageLoras

    assert [(name, cached) for name, _, cached in StageLoras(tmp_path, None, "transformer").listing()] == [
        ("good", False)
    ]


@pytest.mark.parametrize("weight", [math.nan, math.inf, -math.inf, 4.01, -5, "1", None, True])
def test_weights_are_checked(weight, lora_dir):
    with pytest.raises(InvalidArgument) as info:
        LoraLibrary(lora_dir).check([("kohya/a", 1.0), ("kohya/b", weight)])
    assert info.value.field == "loras[1].weight"


def test_weight_bounds_and_duplicates(lora_dir):
    assert check_lora_weight(-4, "w") == -4.0 and check_lora_weight(4.0, "w") == 4.0
    with pytest.raises(InvalidArgument, match="listed twice"):
        LoraLibrary(lora_dir).check([("kohya/a", 1.0), ("kohya/a", 0.5)])


def test_bad_files_are_invalid_arguments_and_change_nothing(dev_model, lora_dir, tmp_path, base_image):
    import shutil

    shutil.copy(lora_dir / "kohya" / "a.safetensors", tmp_path / "good.safetensors")
    write_garbage(tmp_path / "garbage.safetensors")
    write_truncated(tmp_path / "good.safetensors", tmp_path / "truncated.safetensors")
    write_not_a_lora(tmp_path / "weights.safetensors")
    write_peft_lora(tmp_path / "nan.safetensors", dev_model, seed=3, text_encoder=False)
    from safetensors.torch import load_file, save_file

    sd = load_file(str(tmp_path / "nan.safetensors"))
    next(iter(sd.values()))[0, 0] = math.nan
    save_file(sd, str(tmp_path / "nan.safetensors"))
    # Made for a FLUX twice as wide: converts fine, fits no layer here.
    wide = {}
    for key, value in load_file(str(tmp_path / "good.safetensors")).items():
        if key.startswith("lora_unet") and value.ndim == 2:
            out, inp = value.shape
            wide[key] = torch.zeros(out * 2, inp) if "lora_up" in key else torch.zeros(out, inp * 2)
    save_file(wide, str(tmp_path / "wide.safetensors"))

    # Types torch has no kernels for (isfinite on float8 raised NotImplementedError, which
    # reached clients as UNIMPLEMENTED) or that are no LoRA weights at all.
    good = load_file(str(tmp_path / "good.safetensors"))
    save_file({k: v.to(torch.float8_e4m3fn) for k, v in good.items()}, str(tmp_path / "float8.safetensors"))
    save_file(
        {k: (v * 100).to(torch.int32) if v.ndim else v for k, v in good.items()}, str(tmp_path / "ints.safetensors")
    )

    served = Served(dev_model, tmp_path)
    for name, reason in [
        ("float8", r"\(float8.safetensors\): tensor '.*' is float8_e4m3fn; LoRA weights must be float32"),
        ("ints", r"\(ints.safetensors\): tensor '.*' is int32"),
        ("garbage", "not a readable safetensors file"),
        ("truncated", "not a readable safetensors file"),
        ("weights", "no recognisable FLUX LoRA keys"),
        ("nan", "NaN"),
        ("wide", "does not fit this model"),
    ]:
        with pytest.raises(InvalidArgument, match=reason) as info:
            served.transformer.activate([("good", 0.8), (name, 0.5)])
        assert info.value.field == "loras[1].name" and repr(name) in info.value.message
        assert served.transformer.loaded() in ([], ["good"])  # the good one may be loaded, nothing else
        assert "wide" not in served.transformer.loaded()
    # The model still serves, with and without LoRAs.
    assert np.array_equal(served.image([]), base_image)
    assert _max_diff(served.image([("good", 1.0)]), base_image) > 0


# -- GGUF base -----------------------------------------------------------------------------


def test_gguf_base_keeps_quantized_weights(dev_model, lora_dir, tmp_path):
    gguf_mod = pytest.importorskip("fluxmesh.services.gguf")
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    path = gguf_mod.quantize_transformer(dev_model, tmp_path / "tiny-Q8_0.gguf", "Q8_0", "bfl")

    def load():
        return gguf_mod.load_gguf_transformer(path, dev_model)

    base = _image(_pipeline(dev_model, load()))
    served = Served(dev_model, lora_dir, transformer=load())
    quantized = {n for n, m in served.pipe.transformer.named_modules() if isinstance(m, GGUFLinear)}
    assert quantized, "the GGUF transformer should have quantized linear layers"

    for fmt in ("kohya", "peft"):
        image = served.image([(f"{fmt}/{n}", w) for w, n in STACK])
        expected = _reference(dev_model, [(lora_dir / fmt / f"{n}.safetensors", w) for w, n in STACK], load())
        assert _max_diff(image, expected) <= 1
        assert np.abs(image - base).mean() > 4
    assert np.array_equal(served.image([]), base)
    # PEFT wrapped the quantized layers; it did not dequantize them.
    modules = dict(served.pipe.transformer.named_modules())
    for name in quantized:
        assert isinstance(modules[name].weight, GGUFParameter), name
