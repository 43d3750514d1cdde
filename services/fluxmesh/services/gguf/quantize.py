"""Write FLUX transformer and T5 encoder GGUF files in the community layout.

Transformer files follow city96 (ComfyUI-GGUF, `tools/convert.py` + its llama.cpp patch): arch
"flux", BFL tensor names, and these tensors kept unquantized whatever the target type:
  * 1-D tensors (biases, norm scales) and tensors of <= 1024 values: F32 (F16 from an F16 source);
  * `img_in`, `time_in.in_layer`, `vector_in.in_layer`, `guidance_in.in_layer`, `final_layer.linear`:
    F32; the rest of `txt_in`, `time_in`, `vector_in`, `guidance_in`, `final_layer`: F16;
  * a tensor whose row length is not a multiple of the type's block size: F16.
T5 files follow city96/t5-v1_1-xxl-encoder-gguf (llama.cpp's convert_hf_to_gguf + llama-quantize):
arch "t5encoder", llama.cpp names (`enc.blk.0.attn_q.weight`), the hyper-parameters and the
SentencePiece vocabulary as metadata, so transformers' GGUF loader rebuilds config and tokenizer.

Tensors are read, converted and written one at a time (shapes are known up front), so a
12B-parameter model needs about one tensor's worth of memory, not the whole model.
"""

from __future__ import annotations

import base64
import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as G

from fluxmesh.rpc.errors import InvalidArgument, NotFound

from . import naming as names  # the module; `naming` is quantize_transformer's argument
from ._kquants import KQUANT_ENCODERS
from .errors import GGUFFileError
from .types import Naming, QuantType

__all__ = ["Naming", "QuantType", "quantize_t5", "quantize_transformer", "transformer_gguf_size"]


# general.file_type as llama.cpp records it; a uniform K-quant file is closest to its "_S" mix.
_FILE_TYPE = {
    G.F32: gguf.LlamaFileType.ALL_F32,
    G.F16: gguf.LlamaFileType.MOSTLY_F16,
    G.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    G.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
    G.Q6_K: gguf.LlamaFileType.MOSTLY_Q6_K,
    G.Q5_K: gguf.LlamaFileType.MOSTLY_Q5_K_S,
    G.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    G.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    G.Q4_K: gguf.LlamaFileType.MOSTLY_Q4_K_S,
    G.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    G.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
}
_FLOAT_TYPES = (G.F32, G.F16, G.BF16)
_SMALL_TENSOR = 1024  # city96's QUANTIZATION_THRESHOLD
# city96's llama.cpp patch: FLUX tensors kept in F32 / F16 in quantized files (substring match).
_FLUX_KEEP_F32 = ("img_in.", "time_in.in_layer.", "vector_in.in_layer.", "guidance_in.in_layer.", "final_layer.linear.")
_FLUX_KEEP_F16 = ("txt_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


@dataclass(frozen=True)
class _Tensor:
    """One output tensor: its name and shape are known before `build` reads and converts it."""

    name: str
    shape: tuple[int, ...]
    qtype: G
    build: Callable[[], Any]  # -> torch.Tensor, read and converted only when written


def _parse_qtype(qtype: str | QuantType) -> QuantType:
    try:
        return QuantType(str(getattr(qtype, "value", qtype)).upper())
    except ValueError:
        choices = ", ".join(q.value for q in QuantType)
        raise InvalidArgument("qtype", f"{qtype!r} is not a type fluxmesh writes; choose one of {choices}") from None


def _choose_qtype(policy_name: str, shape: tuple[int, ...], source_f16: bool, target: G, flux: bool) -> G:
    """The GGML type one tensor is stored in, by the community rules in the module docstring."""
    keep = G.F16 if source_f16 else G.F32
    if len(shape) == 1 or math.prod(shape) <= _SMALL_TENSOR or "attn_rel_b" in policy_name:
        return keep  # llama.cpp never quantizes T5's relative position bias either
    if target in _FLOAT_TYPES:
        return target
    if flux and any(p in policy_name for p in _FLUX_KEEP_F32):
        return G.F32
    if flux and any(p in policy_name for p in _FLUX_KEEP_F16):
        return G.F16
    if shape[-1] % gguf.GGML_QUANT_SIZES[target][0]:
        return G.F16
    return target


def _encode(array: np.ndarray, qtype: G) -> np.ndarray:
    if qtype in KQUANT_ENCODERS:
        rows = array.reshape(-1, array.shape[-1])
        blocks = KQUANT_ENCODERS[qtype](rows.reshape(-1, 256))
        return blocks.reshape(*array.shape[:-1], -1)
    return gguf.quants.quantize(array, qtype)  # F32/F16 as float arrays, the rest as uint8 blocks


def _nbytes(shape: tuple[int, ...], qtype: G) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _check_output(output: Path, inputs: list[Path], force: bool) -> None:
    """Refuse, before any work, to write over a file this run reads (never, even with `force`:
    the source would be gone once the rename lands) or over any existing file without `force`."""
    if output.is_dir():
        raise InvalidArgument("output", f"{output} is a folder; name the .gguf file to write")
    if not output.exists():
        return
    for source in inputs:
        if source.exists() and os.path.samefile(output, source):
            raise InvalidArgument("output", f"{output} is a source file of this conversion; write elsewhere")
    if not force:
        raise InvalidArgument("output", f"{output} exists; pass --force (force=True) to replace it")


def _write(output: Path, arch: str, metadata: Callable[[gguf.GGUFWriter], None], tensors: list[_Tensor]) -> Path:
    """Stream `tensors` into a GGUF file: header and tensor infos first, then data one by one.

    Written to a new temporary file beside `output` (a unique name: a fixed `.part` name could
    be another run's, or a symlink to anywhere) and renamed at the end, so a failed run leaves no
    half-file that looks like a model and an existing output stays whole until the new one is.
    """
    import tempfile

    import torch

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".part")
    os.close(fd)
    part = Path(name)
    writer = gguf.GGUFWriter(path=None, arch=arch)
    metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), _nbytes(t.shape, t.qtype), raw_dtype=t.qtype)
    try:
        writer.write_header_to_file(path=part)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in tensors:
            tensor = t.build()
            if tuple(tensor.shape) != t.shape:
                raise RuntimeError(f"{t.name}: built shape {tuple(tensor.shape)} != planned {t.shape}")
            writer.write_tensor_data(_encode(tensor.detach().to(torch.float32).numpy(), t.qtype))
        writer.close()
        part.chmod(0o644)  # mkstemp makes it 0600; a model file is as readable as any other
        os.replace(part, output)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return output


class _SafetensorsSource:
    """Tensors of one or more .safetensors files, read lazily by name."""

    def __init__(self, files: list[Path]):
        from safetensors import safe_open

        self._handles = {}
        self.where: dict[str, tuple[object, str]] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise GGUFFileError(file, f"cannot read as safetensors ({e})") from None
            self._handles[file] = handle
            for key in handle.keys():
                if key in self.where:  # e.g. a .fp16 variant beside the weights: which one is meant?
                    raise GGUFFileError(file, f"tensor {key!r} is also in another .safetensors file of the source")
                self.where[key] = (handle, key)

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, key: str) -> tuple[int, ...]:
        handle, raw = self.where[key]
        return tuple(handle.get_slice(raw).get_shape())

    def is_f16(self, key: str) -> bool:
        handle, raw = self.where[key]
        return handle.get_slice(raw).get_dtype() == "F16"

    def get(self, key: str):
        handle, raw = self.where[key]
        return handle.get_tensor(raw)


def _component_files(source: Path, subfolder: str, what: str) -> tuple[Path, list[Path]]:
    """(folder, its .safetensors files) for a model folder or the component folder itself."""
    source = Path(source)
    if not source.exists():
        raise NotFound(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix != ".safetensors":  # no pickle anywhere: .ckpt/.pt/.bin are not read
            raise GGUFFileError(source, "source weights must be a .safetensors file or a diffusers folder")
        return source.parent, [source]
    folder = source / subfolder if (source / subfolder / "config.json").is_file() else source
    index = sorted(folder.glob("*.safetensors.index.json"))
    if index:  # sharded weights: the index names the shards (a folder may hold other variants)
        shards = json.loads(index[0].read_text()).get("weight_map", {}).values()
        files = [folder / name for name in sorted(set(shards))]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not files:
        reason = f"not a diffusers {what} folder (no {subfolder}/config.json with .safetensors weights)"
        raise GGUFFileError(source, reason)
    return folder, files


# --------------------------------------------------------------------------- transformer


def _transformer_plan(src: _SafetensorsSource, naming_out: Naming, target: G, source: Path) -> list[_Tensor]:
    # Strip "model.diffusion_model." as ComfyUI-style single files carry it.
    keys = {names.strip_bfl_prefix(k): k for k in src.keys()}
    raw = lambda key: src.get(keys[key])  # noqa: E731
    shape = lambda key: src.shape(keys[key])  # noqa: E731
    f16 = lambda key: src.is_f16(keys[key])  # noqa: E731
    from_bfl = names.is_bfl_naming(keys)
    try:
        if from_bfl:
            recipes = names.recipes_for_bfl_keys(keys)
            names.check_names(keys, recipes, "BFL")
        else:
            recipes = names.recipes_for_diffusers_keys(keys)
            names.check_names(keys, names.diffusers_names(recipes), "diffusers")
    except KeyError as e:
        raise GGUFFileError(source, e.args[0]) from None
    plan: list[_Tensor] = []
    inner_dim = shape("img_in.weight")[0] if from_bfl else shape("x_embedder.weight")[0]
    for bfl_name, recipe in recipes.items():
        if from_bfl:
            bfl_shape, is_f16 = shape(bfl_name), f16(bfl_name)
            parts = [(r, *bfl_shape[1:]) for r in recipe.rows(bfl_shape[0], inner_dim)]
        else:
            parts = [shape(s) for s in recipe.sources]
            bfl_shape, is_f16 = (sum(p[0] for p in parts), *parts[0][1:]), f16(recipe.sources[0])
        # Types are chosen on the BFL tensor, so both namings store the same values (and row-wise
        # blocks make a slice of a quantized tensor the quantized slice).
        qtype = _choose_qtype(bfl_name, bfl_shape, is_f16, target, flux=True)
        if naming_out is Naming.bfl:
            build = (lambda n=bfl_name: raw(n)) if from_bfl else (lambda r=recipe: r.build(raw))
            plan.append(_Tensor(bfl_name, bfl_shape, qtype, build))
            continue
        for name, part in zip(recipe.sources, parts):
            if from_bfl:
                build = lambda r=recipe, n=bfl_name, s=name: r.split(raw(n), inner_dim)[s]  # noqa: E731
            else:
                build = lambda s=name: raw(s)  # noqa: E731
            plan.append(_Tensor(name, part, qtype, build))
    return plan


def quantize_transformer(
    source: str | Path,
    output: str | Path,
    qtype: str | QuantType = QuantType.Q8_0,
    naming: str | Naming = Naming.bfl,
    *,
    force: bool = False,
) -> Path:
    """Write a FLUX transformer as GGUF and return the output path.

    An existing `output` is replaced only with `force`, and never when it is one of the source's
    own files.

    `source`: a diffusers model folder, its `transformer/` folder, or a single .safetensors file
    (BFL or diffusers names, with or without the `model.diffusion_model.` prefix).
    `naming="bfl"` writes community (city96) names; `"diffusers"` writes diffusers' names.
    """
    target = _parse_qtype(qtype).ggml
    try:
        naming_out = Naming(getattr(naming, "value", naming))
    except ValueError:
        raise InvalidArgument("naming", f"{naming!r}: choose 'bfl' or 'diffusers'") from None
    folder, files = _component_files(Path(source), "transformer", "FLUX transformer")
    _check_output(Path(output), [*files, *folder.glob("*.json")], force)
    plan = _transformer_plan(_SafetensorsSource(files), naming_out, target, Path(source))

    def metadata(writer: gguf.GGUFWriter) -> None:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_file_type(_FILE_TYPE[target])

    return _write(Path(output), "flux", metadata, plan)


def transformer_gguf_size(source: str | Path, qtype: str | QuantType = QuantType.Q8_0) -> tuple[int, int]:
    """What `quantize_transformer(source, ..., qtype)` would store, from the safetensors headers
    alone (no tensor data is read): (bytes of the quantized tensors, number of values kept as
    floats). Loaded, the quantized tensors stay as they are and the float ones take the compute
    dtype, so the loaded transformer holds `quantized + floats * dtype size` bytes."""
    target = _parse_qtype(qtype).ggml
    _, files = _component_files(Path(source), "transformer", "FLUX transformer")
    plan = _transformer_plan(_SafetensorsSource(files), Naming.bfl, target, Path(source))
    quantized = sum(_nbytes(t.shape, t.qtype) for t in plan if t.qtype not in _FLOAT_TYPES)
    floats = sum(math.prod(t.shape) for t in plan if t.qtype in _FLOAT_TYPES)
    return quantized, floats


# --------------------------------------------------------------------------- T5 encoder


def _t5_vocab(tokenizer_json: Path, vocab_size: int) -> dict[str, object]:
    """SentencePiece vocabulary as llama.cpp's convert_hf_to_gguf writes it for T5.

    T5's `<extra_id_N>` tokens are not SentencePiece pieces, so llama.cpp writes them (and the
    padding up to the embedding's row count) as `[PAD<id>]` placeholders; transformers' GGUF
    tokenizer renames the first 100 of those back to `<extra_id_99>`..`<extra_id_0>`.
    """
    data = json.loads(tokenizer_json.read_text())
    model = data.get("model", {})
    if model.get("type") != "Unigram":
        reason = f"T5 tokenizer must be a Unigram (SentencePiece) model, got {model.get('type')!r}"
        raise GGUFFileError(tokenizer_json, reason)
    special = {t["content"] for t in data.get("added_tokens", []) if t.get("special")}
    tokens, scores, types = [], [], []
    for i, (piece, score) in enumerate(model["vocab"]):
        if piece.startswith("<extra_id_"):
            piece, kind = f"[PAD{i}]", gguf.TokenType.USER_DEFINED
        elif i == model.get("unk_id"):
            kind = gguf.TokenType.UNKNOWN
        elif piece in special:
            kind = gguf.TokenType.CONTROL
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece)
        scores.append(float(score))
        types.append(kind)
    for i in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    ids = {piece: i for i, piece in enumerate(tokens)}
    charsmap = None
    normalizer = data.get("normalizer") or {}
    for norm in normalizer.get("normalizers", [normalizer]):
        if norm and norm.get("type") == "Precompiled" and norm.get("precompiled_charsmap"):
            charsmap = base64.b64decode(norm["precompiled_charsmap"])
    return {"tokens": tokens, "scores": scores, "types": types, "ids": ids, "charsmap": charsmap}


def quantize_t5(
    source: str | Path, output: str | Path, qtype: str | QuantType = QuantType.Q8_0, *, force: bool = False
) -> Path:
    """Write a T5 encoder (FLUX's `text_encoder_2`) as a t5encoder GGUF and return the output path.
    `output` is treated as `quantize_transformer` treats it.

    `source`: a diffusers model folder (uses `text_encoder_2/` and `tokenizer_2/`) or the
    `text_encoder_2` folder itself (the tokenizer is then looked up beside it).
    """
    target = _parse_qtype(qtype).ggml
    source = Path(source)
    folder, files = _component_files(source, "text_encoder_2", "T5 encoder")
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type") not in ("t5", "umt5"):
        reason = f"model_type is {config.get('model_type')!r}, expected a T5 encoder"
        raise GGUFFileError(folder / "config.json", reason)
    tokenizer = next((p for p in (folder.parent / "tokenizer_2", folder) if (p / "tokenizer.json").is_file()), None)
    if tokenizer is None:
        reason = "no tokenizer_2/tokenizer.json beside the T5 encoder (the GGUF carries the vocabulary)"
        raise GGUFFileError(source, reason)
    _check_output(Path(output), [*files, *folder.glob("*.json"), *tokenizer.glob("*")], force)
    vocab = _t5_vocab(tokenizer / "tokenizer.json", config["vocab_size"])

    src = _SafetensorsSource(files)
    keys = src.keys()
    if "shared.weight" in keys:  # the tied copy is the same tensor; llama.cpp keeps one
        keys = [k for k in keys if k != "encoder.embed_tokens.weight"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, config["num_layers"])
    plan = []
    for key in keys:
        stem, _, suffix = key.rpartition(".")
        mapped = names.get_name(stem)
        if mapped is None:
            if key.startswith("decoder.") or key == "lm_head.weight":
                continue  # a full T5: only the encoder goes into a t5encoder file
            raise GGUFFileError(source, f"tensor {key!r} has no llama.cpp T5 name")
        name = f"{mapped}.{suffix}"
        shape = src.shape(key)
        qt = _choose_qtype(name, shape, src.is_f16(key), target, flux=False)
        plan.append(_Tensor(name, shape, qt, lambda k=key: src.get(k)))

    def metadata(w: gguf.GGUFWriter) -> None:
        w.add_name("T5")
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_file_type(_FILE_TYPE[target])
        # the hyper-parameters llama.cpp's T5EncoderModel converter writes
        w.add_context_length(config.get("n_positions", 512))
        w.add_embedding_length(config["d_model"])
        w.add_feed_forward_length(config["d_ff"])
        w.add_block_count(config["num_layers"])
        w.add_head_count(config["num_heads"])
        w.add_key_length(config["d_kv"])
        w.add_value_length(config["d_kv"])
        w.add_layer_norm_eps(config.get("layer_norm_epsilon", 1e-6))
        w.add_layer_norm_rms_eps(config.get("layer_norm_epsilon", 1e-6))
        w.add_relative_attn_buckets_count(config.get("relative_attention_num_buckets", 32))
        w.add_decoder_start_token_id(config.get("decoder_start_token_id", 0))
        # the tokenizer, as llama.cpp's T5 set_vocab writes it
        w.add_tokenizer_model("t5")
        w.add_tokenizer_pre("default")
        w.add_token_list(vocab["tokens"])
        w.add_token_scores(vocab["scores"])
        w.add_token_types(vocab["types"])
        ids = vocab["ids"]
        for add, token in ((w.add_pad_token_id, "<pad>"), (w.add_eos_token_id, "</s>"), (w.add_unk_token_id, "<unk>")):
            if token in ids:
                add(ids[token])
        w.add_add_bos_token(False)
        w.add_add_eos_token(True)
        w.add_add_space_prefix(True)
        w.add_remove_extra_whitespaces(True)
        if vocab["charsmap"]:
            w.add_precompiled_charsmap(vocab["charsmap"])

    return _write(Path(output), "t5encoder", metadata, plan)
