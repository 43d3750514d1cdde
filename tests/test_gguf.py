"""GGUF: diffusers<->BFL naming, writing every quant type, loading through diffusers/transformers.

Models are the tiny random-weight FLUX folders from `write_tiny_model`, plus one "wide"
transformer (inner width 256) so that K-quants, whose blocks are 256 values, really apply.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument, NotFound
from fluxmesh.services.gguf import (
    GGUFFileError,
    QuantType,
    bfl_to_diffusers,
    diffusers_to_bfl,
    load_gguf_t5,
    load_gguf_transformer,
    quantize_cli,
    quantize_t5,
    quantize_transformer,
)
from fluxmesh.services.gguf._kquants import KQUANT_ENCODERS
from fluxmesh.services.tools.tiny_model import write_tiny_model

torch.set_num_threads(1)
G = gguf.GGMLQuantizationType


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny")


@pytest.fixture(scope="module")
def tiny_schnell(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("gguf") / "tiny-schnell", schnell=True)


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """A transformer 256 wide (4M parameters): every big weight's rows fit K-quant blocks."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=128,
        num_attention_heads=2,
        joint_attention_dim=256,
        pooled_projection_dim=256,
        guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ).eval()
    folder = tmp_path_factory.mktemp("gguf") / "wide"
    model.save_pretrained(folder / "transformer")
    return folder, model


@pytest.fixture(scope="module")
def files(tiny, tmp_path_factory):
    """Q8_0 transformer files in both namings, and a Q8_0 T5 file."""
    out = tmp_path_factory.mktemp("gguf-files")
    return {
        "bfl": quantize_transformer(tiny, out / "flux-Q8_0.gguf", "Q8_0", "bfl"),
        "diffusers": quantize_transformer(tiny, out / "flux-Q8_0-diffusers.gguf", "Q8_0", "diffusers"),
        "t5": quantize_t5(tiny, out / "t5-Q8_0.gguf", "Q8_0"),
    }


def _tiny_state_dict(folder):
    return load_file(folder / "transformer" / "diffusion_pytorch_model.safetensors")


def _types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


def _dequantized(param) -> torch.Tensor:
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    return dequantize_gguf_tensor(param).float() if hasattr(param, "quant_type") else param.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative RMS error of `a` against reference `b`."""
    return ((a - b).pow(2).mean() / b.pow(2).mean().clamp_min(1e-30)).sqrt().item()


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


# ----------------------------------------------------------------------------- naming


@pytest.mark.parametrize("schnell", [False, True], ids=["dev", "schnell"])
def test_naming_round_trip_is_bit_exact(tiny, tiny_schnell, schnell):
    sd = _tiny_state_dict(tiny_schnell if schnell else tiny)
    bfl = diffusers_to_bfl(sd)
    assert ("guidance_in.in_layer.weight" in bfl) is not schnell
    assert {"double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"} <= bfl.keys()
    back = bfl_to_diffusers(bfl)
    assert back.keys() == sd.keys()
    for key, tensor in sd.items():
        assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), key
    # the ComfyUI prefix is accepted too
    prefixed = {f"model.diffusion_model.{k}": v for k, v in bfl.items()}
    assert all(torch.equal(bfl_to_diffusers(prefixed)[k], sd[k]) for k in sd)


def test_bfl_names_are_what_diffusers_converter_expects(tiny):
    """diffusers' converter consumes every name we write and gives back every tensor.

    It hard-codes FLUX.1's width (q/k/v 3072 rows, MLP 12288) for `linear1`, so those tensors are
    zero-padded to that layout; the real rows must come back in the right places.
    """
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    sd = _tiny_state_dict(tiny)
    inner = sd["x_embedder.weight"].shape[0]
    bfl = diffusers_to_bfl(sd)

    def pad(t, rows):
        return torch.cat([t, t.new_zeros((rows - t.shape[0], *t.shape[1:]))])

    for key in [k for k in bfl if ".linear1." in k]:
        q, k, v, mlp = torch.split(bfl[key], [inner, inner, inner, bfl[key].shape[0] - 3 * inner])
        bfl[key] = torch.cat([pad(q, 3072), pad(k, 3072), pad(v, 3072), pad(mlp, 12288)])
    converted = convert_flux_transformer_checkpoint_to_diffusers(bfl)
    assert bfl == {}, f"names diffusers does not read: {sorted(bfl)}"
    assert converted.keys() == sd.keys()
    for key, tensor in sd.items():
        assert torch.equal(converted[key][: tensor.shape[0]], tensor), key


# ----------------------------------------------------------------------------- K-quant encoders


@pytest.mark.parametrize("qtype", sorted(KQUANT_ENCODERS, key=lambda q: q.name), ids=lambda q: q.name)
def test_kquant_blocks_decode_alike_in_gguf_py_and_diffusers(qtype):
    from diffusers.quantizers.gguf.utils import GGUFParameter, dequantize_gguf_tensor

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((8, 512)) * 0.05).astype(np.float32)
    x[1] = 0.0  # all-zero blocks must not divide by zero
    x[2, :256] = np.abs(x[2, :256])  # a block with no negative values (min clamps to 0)
    blocks = KQUANT_ENCODERS[qtype](x.reshape(-1, 256)).reshape(8, -1)
    assert blocks.shape[1] == 2 * gguf.GGML_QUANT_SIZES[qtype][1]
    by_gguf = gguf.quants.dequantize(blocks, qtype)
    by_diffusers = dequantize_gguf_tensor(GGUFParameter(torch.from_numpy(blocks), quant_type=qtype)).float().numpy()
    # diffusers decodes in fp16: agreement to fp16 rounding
    assert np.abs(by_gguf - by_diffusers).max() < 1e-3
    assert np.all(by_gguf[1] == 0)
    # measured relative RMS error: Q6_K 0.019, Q5_K 0.038, Q4_K 0.078 (= gguf-py's own Q5_1/Q4_1)
    bound = {G.Q6_K: 0.03, G.Q5_K: 0.06, G.Q4_K: 0.12}[qtype]
    assert _rel(torch.from_numpy(by_gguf), torch.from_numpy(x)) < bound


# ----------------------------------------------------------------------------- writing + loading

# Relative RMS error of the worst weight after a write/load round trip, measured on `wide`:
# F16 2e-4, BF16 1.6e-3, Q8_0 3.8e-3, Q6_K 0.015, Q5_K/Q5_1/Q5_0 0.030-0.031, Q4_K/Q4_1/Q4_0
# 0.061-0.065. Bounds are about twice that.
_WEIGHT_BOUND = {
    "F32": 0.0,
    "F16": 1e-3,
    "BF16": 5e-3,
    "Q8_0": 0.01,
    "Q6_K": 0.03,
    "Q5_K": 0.06,
    "Q5_1": 0.06,
    "Q5_0": 0.06,
    "Q4_K": 0.12,
    "Q4_1": 0.12,
    "Q4_0": 0.12,
}


def test_every_quant_type_has_a_bound():
    assert set(_WEIGHT_BOUND) == {q.value for q in QuantType}


@pytest.mark.parametrize("qtype", [q.value for q in QuantType])
def test_each_qtype_writes_in_community_layout_and_loads(wide, tmp_path, qtype):
    folder, model = wide
    path = quantize_transformer(folder, tmp_path / f"wide-{qtype}.gguf", qtype)
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == "flux"
    assert reader.fields["general.file_type"].contents() == {
        "F32": 0, "F16": 1, "BF16": 32, "Q8_0": 7, "Q6_K": 18, "Q5_K": 16,
        "Q5_1": 9, "Q5_0": 8, "Q4_K": 14, "Q4_1": 3, "Q4_0": 2,
    }[qtype]  # fmt: skip
    types = _types(path)
    # the big matmul weights carry the asked type; biases and norms stay F32 (city96's rules)
    big = ("double_blocks.0.img_attn.qkv.weight", "double_blocks.0.img_mlp.2.weight", "single_blocks.0.linear2.weight")
    for name in big:
        assert types[name] == qtype, name
    assert types["double_blocks.0.img_attn.qkv.bias"] == "F32"
    assert types["single_blocks.0.norm.query_norm.scale"] == "F32"
    if qtype not in ("F32", "F16", "BF16"):  # llama.cpp-patch rules for embedders and final layer
        assert types["img_in.weight"] == "F32" and types["final_layer.linear.weight"] == "F32"
        assert types["txt_in.weight"] == "F16" and types["final_layer.adaLN_modulation.1.weight"] == "F16"

    loaded = load_gguf_transformer(path, folder)
    reference = model.state_dict()
    worst = max(_rel(_dequantized(p), reference[n]) for n, p in loaded.named_parameters())
    assert worst <= _WEIGHT_BOUND[qtype]
    if qtype not in ("F32", "F16"):  # quantized weights stay packed: GGUFLinear, dequantized per matmul
        assert type(loaded.transformer_blocks[0].ff.net[2]).__name__ == "GGUFLinear"

    g = torch.Generator().manual_seed(1)
    inputs = dict(
        hidden_states=torch.randn(1, 16, 64, generator=g),
        encoder_hidden_states=torch.randn(1, 8, 256, generator=g),
        pooled_projections=torch.randn(1, 256, generator=g),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([3.5]),
    )
    with torch.no_grad():
        expected, got = model(**inputs).sample, loaded(**inputs).sample
    assert _rel(got, expected) <= _WEIGHT_BOUND[qtype]  # measured 10x below the weight error


def test_kquant_falls_back_to_f16_where_rows_do_not_fit(tiny, tmp_path):
    # the tiny model's rows are 32..256 long, not multiples of 256 except the timestep embedders
    types = _types(quantize_transformer(tiny, tmp_path / "tiny-Q4_K.gguf", "Q4_K"))
    assert types["double_blocks.0.img_mlp.0.weight"] == "F16"
    assert "Q4_K" not in types.values()


@pytest.mark.parametrize("naming", ["bfl", "diffusers"])
def test_read_tensors_gives_what_diffusers_loader_gives(files, naming):
    """fluxmesh reads GGUF tensors itself (for a lower load peak); the result is diffusers' own."""
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    from fluxmesh.services.gguf.loading import read_gguf, read_tensors

    path = files[naming]
    ours, theirs = read_tensors(path, read_gguf(path, ("flux",))), load_gguf_checkpoint(str(path))
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        got = ours[name]
        assert type(got) is type(tensor) and got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert getattr(got, "quant_type", None) == getattr(tensor, "quant_type", None), name
        assert getattr(got, "quant_shape", None) == getattr(tensor, "quant_shape", None), name
        assert torch.equal(got.view(torch.uint8), tensor.view(torch.uint8)), name
    assert any(getattr(t, "quant_type", None) == G.Q8_0 for t in ours.values())  # both kinds were compared


def test_loads_with_bfloat16_compute(tiny, files):
    model = load_gguf_transformer(files["bfl"], tiny, compute_dtype=torch.bfloat16)
    layer = model.transformer_blocks[0].ff.net[0].proj
    assert type(layer).__name__ == "GGUFLinear" and layer.compute_dtype == torch.bfloat16
    out = layer(torch.randn(2, layer.in_features, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_f16_file_is_the_f16_rounded_model(tiny, tmp_path):
    sd = _tiny_state_dict(tiny)
    loaded = load_gguf_transformer(quantize_transformer(tiny, tmp_path / "f16.gguf", "F16"), tiny)
    for name, param in loaded.named_parameters():
        assert param.dtype == torch.float32, name
        assert torch.equal(param, sd[name]) or torch.equal(param, sd[name].half().float()), name


def test_sources_single_file_bfl_and_diffusers_give_the_same_tensors(tiny, files, tmp_path):
    sd = _tiny_state_dict(tiny)
    comfy = tmp_path / "flux1-tiny.safetensors"  # a BFL single file as ComfyUI ships them
    save_file({f"model.diffusion_model.{k}": v.contiguous() for k, v in diffusers_to_bfl(sd).items()}, comfy)
    diffusers_file = tmp_path / "diffusers.safetensors"
    save_file(sd, diffusers_file)
    reference = {t.name: t.data.tobytes() for t in gguf.GGUFReader(files["bfl"]).tensors}
    from diffusers import FluxTransformer2DModel

    sharded = tmp_path / "sharded"
    FluxTransformer2DModel.from_pretrained(tiny / "transformer").save_pretrained(sharded, max_shard_size="60KB")
    assert len(list(sharded.glob("*.safetensors"))) > 1
    for source in (comfy, diffusers_file, tiny / "transformer", sharded):
        out = quantize_transformer(source, tmp_path / f"{source.stem}.gguf", "Q8_0", "bfl")
        assert {t.name: t.data.tobytes() for t in gguf.GGUFReader(out).tensors} == reference, source
    # BFL source, diffusers names out: the same bytes as from the diffusers folder
    out = quantize_transformer(comfy, tmp_path / "comfy-diffusers.gguf", "Q8_0", "diffusers")
    expected = {t.name: t.data.tobytes() for t in gguf.GGUFReader(files["diffusers"]).tensors}
    assert {t.name: t.data.tobytes() for t in gguf.GGUFReader(out).tensors} == expected


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(tiny, local_files_only=True)


def _generate(pipe, transformer, seed: int, prompt: str) -> np.ndarray:
    pipe.transformer = transformer
    generator = torch.Generator("cpu").manual_seed(seed)
    image = pipe(prompt, height=64, width=64, num_inference_steps=4, guidance_scale=3.5, generator=generator).images[0]
    return np.asarray(image)


_PROMPTS = [(0, "a photo of a cat"), (1, "an astronaut riding a horse on the moon")]


def test_q8_0_pipeline_images_stay_close_in_both_namings(pipe, tiny, files):
    original = pipe.transformer
    try:
        by_naming = {n: load_gguf_transformer(files[n], tiny) for n in ("bfl", "diffusers")}
        for seed, prompt in _PROMPTS:
            reference = _generate(pipe, original, seed, prompt)
            bfl = _generate(pipe, by_naming["bfl"], seed, prompt)
            assert bfl.shape == (64, 64, 3) and bfl.std() > 10  # a real image, not a flat one
            # both namings hold the same values: the same pixels
            assert np.array_equal(bfl, _generate(pipe, by_naming["diffusers"], seed, prompt))
            # Q8_0 vs float32 measured 67.4-68.2 dB (max diff 1 level); 5% weight noise gives 43 dB,
            # another seed 14 dB. Bound: 55 dB.
            assert _psnr(bfl, reference) >= 55.0
    finally:
        pipe.transformer = original


def test_f16_pipeline_image_is_near_exact(pipe, tiny, tmp_path):
    original = pipe.transformer
    try:
        f16 = load_gguf_transformer(quantize_transformer(tiny, tmp_path / "f16.gguf", "F16"), tiny)
        for seed, prompt in _PROMPTS:
            reference, got = _generate(pipe, original, seed, prompt), _generate(pipe, f16, seed, prompt)
            # measured 69-71 dB, max difference 1 level; bound 60 dB and 2 levels
            assert _psnr(got, reference) >= 60.0
            assert np.abs(got.astype(int) - reference.astype(int)).max() <= 2
    finally:
        pipe.transformer = original


# ----------------------------------------------------------------------------- T5


def _t5_embeddings(model, folder):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(folder / "tokenizer_2", local_files_only=True)
    prompts = ["a photo of a cat", "a red fox in the snow"]
    ids = tokenizer(prompts, padding="max_length", max_length=512, return_tensors="pt")
    with torch.no_grad():
        return model(ids.input_ids).last_hidden_state


def test_t5_gguf_layout_and_embeddings(tiny, files, tmp_path):
    from transformers import T5EncoderModel

    reader = gguf.GGUFReader(files["t5"])
    assert reader.fields["general.architecture"].contents() == "t5encoder"
    types = _types(files["t5"])
    assert types["enc.blk.0.ffn_gate.weight"] == "Q8_0" and types["token_embd.weight"] == "Q8_0"
    assert types["enc.blk.0.attn_rel_b.weight"] == "F32" and types["enc.output_norm.weight"] == "F32"

    original = T5EncoderModel.from_pretrained(tiny / "text_encoder_2", local_files_only=True).eval()
    expected = _t5_embeddings(original, tiny)
    q8 = _t5_embeddings(load_gguf_t5(files["t5"], tiny), tiny)
    # measured: relative RMS error 0.011, cosine 0.99994; bounds 0.03 and 0.999
    assert _rel(q8, expected) < 0.03
    assert torch.nn.functional.cosine_similarity(q8.flatten(1), expected.flatten(1)).min() > 0.999
    f16_file = quantize_t5(tiny / "text_encoder_2", tmp_path / "t5-f16.gguf", "F16")  # the component folder works too
    f16 = _t5_embeddings(load_gguf_t5(f16_file, tiny), tiny)
    assert _rel(f16, expected) < 1e-3  # measured 2.5e-4


def test_t5_gguf_carries_a_tokenizer_transformers_rebuilds(tiny, files):
    from transformers import T5TokenizerFast

    from_folder = T5TokenizerFast.from_pretrained(tiny / "tokenizer_2", local_files_only=True)
    from_gguf = T5TokenizerFast.from_pretrained(
        tiny / "text_encoder_2", gguf_file=str(files["t5"]), local_files_only=True
    )
    text = "a cozy cabin in the woods during autumn, warm colors, zebra!"
    assert from_gguf(text).input_ids == from_folder(text).input_ids


# ----------------------------------------------------------------------------- bad input


def _assert_names_file(error: GGUFFileError, path, words: str):
    assert isinstance(error, FailedPrecondition)
    assert str(path) in str(error) and words in str(error), str(error)


def test_not_a_gguf_file(tiny, tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_text("hello, I am not a model\n")
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(bad, tiny)
    _assert_names_file(e.value, bad, "not a GGUF file")


@pytest.mark.parametrize("fraction", [0.02, 0.5, 0.999])
def test_truncated_file(tiny, files, tmp_path, fraction):
    data = files["bfl"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(cut, tiny)
    _assert_names_file(e.value, cut, "truncated")


def test_wrong_architecture(tiny, files):
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(files["t5"], tiny)
    _assert_names_file(e.value, files["t5"], "wrong architecture 't5encoder'")
    with pytest.raises(GGUFFileError) as e:
        load_gguf_t5(files["bfl"], tiny)
    _assert_names_file(e.value, files["bfl"], "wrong architecture 'flux'")


def _rewrite(source, dest, drop=(), retype=None):
    """Copy a GGUF file (metadata and tensors), leaving out `drop` and re-encoding `retype` ones."""
    reader = gguf.GGUFReader(source)
    writer = gguf.GGUFWriter(dest, reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if not key.startswith("GGUF.") and key != "general.architecture":
            if field.types[0] == gguf.GGUFValueType.ARRAY:
                writer.add_array(key, field.contents())
            else:
                writer.add_key_value(key, field.contents(), field.types[0])
    for t in reader.tensors:
        data, qtype = np.array(t.data), t.tensor_type
        if t.name in drop:
            continue
        if t.name in (retype or {}):
            data, qtype = gguf.quants.quantize(gguf.quants.dequantize(data, qtype), retype[t.name]), retype[t.name]
        writer.add_tensor(t.name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def test_unsupported_quant_type(tiny, files, tmp_path):
    """MXFP4 is a type gguf-py writes but diffusers cannot dequantize."""
    odd = _rewrite(files["bfl"], tmp_path / "mxfp4.gguf", retype={"double_blocks.0.img_mlp.0.weight": G.MXFP4})
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(odd, tiny)
    _assert_names_file(e.value, odd, "'double_blocks.0.img_mlp.0.weight' has quant type MXFP4")
    # and the copy itself is fine: only the type was the problem
    assert load_gguf_transformer(_rewrite(files["bfl"], tmp_path / "copy.gguf"), tiny) is not None


def test_missing_tensors(tiny, files, tmp_path):
    flux = _rewrite(files["bfl"], tmp_path / "flux-short.gguf", drop={"single_blocks.0.linear2.weight"})
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(flux, tiny)
    _assert_names_file(e.value, flux, "single_blocks.0.linear2.weight")
    t5 = _rewrite(files["t5"], tmp_path / "t5-short.gguf", drop={"enc.blk.1.ffn_down.weight"})
    with pytest.raises(GGUFFileError) as e:  # transformers would leave that weight random
        load_gguf_t5(t5, tiny)
    _assert_names_file(e.value, t5, "encoder.block.1.layer.1.DenseReluDense.wo.weight")


def test_file_that_does_not_fit_the_model_folder(tiny_schnell, files):
    # a dev file (with guidance_in) against a schnell folder
    with pytest.raises(GGUFFileError) as e:
        load_gguf_transformer(files["bfl"], tiny_schnell)
    _assert_names_file(e.value, files["bfl"], "guidance_embedder")


def test_t5_file_that_does_not_fit_the_model_folder(files, tmp_path):
    from transformers import T5Config

    other = tmp_path / "other"
    config = T5Config(d_model=48, d_kv=24, d_ff=96, num_layers=2, num_heads=2, vocab_size=142)
    config.save_pretrained(other / "text_encoder_2")
    with pytest.raises(GGUFFileError) as e:
        load_gguf_t5(files["t5"], other)
    _assert_names_file(e.value, files["t5"], "embedding_length is 32")


def test_missing_files_and_bad_arguments(tiny, tmp_path):
    with pytest.raises(NotFound, match="nope.gguf"):
        load_gguf_transformer(tmp_path / "nope.gguf", tiny)
    with pytest.raises(NotFound, match="no-model"):
        quantize_transformer(tmp_path / "no-model", tmp_path / "x.gguf")
    with pytest.raises(InvalidArgument, match="qtype"):
        quantize_transformer(tiny, tmp_path / "x.gguf", "Q3_K")
    with pytest.raises(InvalidArgument, match="naming"):
        quantize_transformer(tiny, tmp_path / "x.gguf", "Q8_0", "comfy")
    pickle = tmp_path / "model.ckpt"
    pickle.write_bytes(b"\x80\x04")
    with pytest.raises(GGUFFileError, match="safetensors"):
        quantize_transformer(pickle, tmp_path / "x.gguf")
    with pytest.raises(GGUFFileError, match="not a FLUX transformer"):
        quantize_transformer(tiny / "vae", tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf*"))  # nothing half-written left behind


def test_quantize_cli(tiny, tmp_path):
    out = quantize_cli(tiny, tmp_path / "cli.gguf", "q4_0", "bfl")
    assert "Q4_0" in _types(out).values()
    out = quantize_cli(tiny, tmp_path / "cli-t5.gguf", "Q8_0", "bfl", component="t5")
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "t5encoder"
    with pytest.raises(InvalidArgument, match="component"):
        quantize_cli(tiny, tmp_path / "x.gguf", "Q8_0", "bfl", component="vae")


def test_quantize_never_writes_over_its_source_and_replaces_only_with_force(tiny, tmp_path):
    import hashlib
    import shutil

    model = shutil.copytree(tiny, tmp_path / "model")  # the shared fixture must stay intact
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    t5_weights = model / "text_encoder_2" / "model.safetensors"
    sums = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (weights, t5_weights)}
    (tmp_path / "alias.gguf").symlink_to(weights)

    for quantize, source, target in (
        (quantize_transformer, model, weights),
        (quantize_transformer, weights, weights),
        (quantize_transformer, model, tmp_path / "alias.gguf"),
        (quantize_t5, model, t5_weights),
    ):
        for force in (False, True):
            with pytest.raises(InvalidArgument, match="output: .* is a source file of this conversion"):
                quantize(source, target, "Q8_0", force=force)
    with pytest.raises(InvalidArgument, match="is a folder"):
        quantize_transformer(model, tmp_path, "Q8_0")
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sums} == sums

    out = tmp_path / "flux.gguf"
    out.write_bytes(b"someone else's file")
    with pytest.raises(InvalidArgument, match="exists; pass --force"):
        quantize_cli(model, out, "Q8_0", "bfl")
    assert out.read_bytes() == b"someone else's file"
    assert quantize_cli(model, out, "Q8_0", "bfl", force=True) == out
    assert "Q8_0" in _types(out).values()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias.gguf", "flux.gguf", "model"]  # no temporary left


def test_a_failed_quantize_leaves_the_old_output_whole(tiny, tmp_path, monkeypatch):
    from fluxmesh.services.gguf import quantize as module

    out = tmp_path / "flux.gguf"
    quantize_transformer(tiny, out, "F16")
    before = out.read_bytes()

    def broken(array, qtype):
        raise OSError("disk full")

    monkeypatch.setattr(module, "_encode", broken)
    with pytest.raises(OSError, match="disk full"):
        quantize_transformer(tiny, out, "Q8_0", force=True)
    assert out.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["flux.gguf"]


def test_quantize_command_refuses_in_one_line(tiny, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    done = subprocess.run(
        [sys.executable, "-m", "fluxmesh.cli", "quantize", str(tiny), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0, done.stderr
    assert "exists; pass --force" in done.stderr and out.read_bytes() == b"keep me"
    done = subprocess.run(
        [sys.executable, "-m", "fluxmesh.cli", "quantize", str(tiny), str(out), "--force"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert gguf.GGUFReader(out).fields["general.architecture"].contents() == "flux"


def _gguf_with_metadata(path, entries: list[bytes]):
    import struct

    def kv(key: str, kind: int, payload: bytes) -> bytes:
        return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", kind) + payload

    arch = kv("general.architecture", 8, struct.pack("<Q", 4) + b"flux")
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries) + 1) + arch + b"".join(entries))
    return path


def test_metadata_beyond_the_bounds_is_refused_before_parsing(tmp_path):
    """gguf-py builds objects for every entry and array item: 200,000 entries took 40 s and
    650 MiB before the file was refused for having no tensors. The header walk refuses at once."""
    import struct
    import time

    from fluxmesh.services.gguf.loading import MAX_ARRAY_ITEMS, MAX_METADATA_ENTRIES, read_gguf

    many = _gguf_with_metadata(
        tmp_path / "many.gguf", [struct.pack("<Q", 2) + b"k%d" % (i % 10) + b"\0\0\0\0\1" for i in range(200_000)]
    )
    items = MAX_ARRAY_ITEMS + 1
    big_array = _gguf_with_metadata(
        tmp_path / "array.gguf", [struct.pack("<Q", 3) + b"big" + struct.pack("<IIQ", 9, 0, items) + bytes(items)]
    )
    long_string = _gguf_with_metadata(
        tmp_path / "string.gguf", [struct.pack("<Q", 1) + b"s" + struct.pack("<IQ", 8, 1 << 40)]
    )
    cut = _gguf_with_metadata(tmp_path / "cut.gguf", [struct.pack("<Q", 1) + b"a"])
    for path, reason in (
        (many, f"200001 metadata entries; the limit is {MAX_METADATA_ENTRIES}"),
        (big_array, f"metadata arrays hold more than {MAX_ARRAY_ITEMS} items"),
        (long_string, "a 1099511627776-byte string"),
        (cut, "the metadata ends early"),
    ):
        started = time.monotonic()
        with pytest.raises(GGUFFileError, match=reason):
            read_gguf(path, ("flux",))  # what the loaders and `plan` open files with
        assert time.monotonic() - started < 2.0
        with pytest.raises(GGUFFileError, match=reason):
            load_gguf_transformer(path, tmp_path)
