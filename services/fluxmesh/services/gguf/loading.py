"""Load GGUF FLUX transformers (through diffusers) and T5 encoders (through transformers), offline.

Every file is checked first, so a bad one fails with a `GGUFFileError` naming the file and the
reason instead of a numpy reshape error from deep inside a loader: not GGUF, cut short, wrong
architecture, a quant type the loader cannot dequantize, tensors that do not fit the model folder.

Quirks worked around here (diffusers 0.42 / transformers 5.23):
* diffusers' BFL->diffusers converter hard-codes FLUX.1's width (inner_dim=3072), so BFL files of
  any other width fail inside `torch.split`. BFL-named files are therefore converted with our own
  `naming.bfl_to_diffusers` (checked against diffusers' converter in the tests) and the converted
  state dict goes to `from_single_file`, which takes a dict as well as a path and then runs its
  normal GGUF path (GGUFLinear layers, weights kept quantized). Diffusers-named files need no
  conversion (`from_single_file` loads them as they are); they go the same way for the checks.
* diffusers' `load_gguf_checkpoint` copies each tensor out of a memory map of the whole file, so
  the load peaks at up to twice the weights (mapped pages + copies); `read_tensors` reads each
  tensor straight into its buffer instead, and the load peaks at ~1.1x the weights.
* transformers rebuilds a T5 config from GGUF metadata with `feed_forward_proj="relu"` (the
  metadata cannot say "gated-gelu"), so T5 v1.1 / FLUX's encoder would silently compute with the
  wrong activation. The config is always taken from the model folder.
* transformers' GGUF loading dequantizes T5 weights to `dtype` at load time (it keeps only some
  LLM architectures packed); the memory win of a T5 GGUF is on disk and in download, not in RAM.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch

from fluxmesh.rpc.errors import NotFound

from . import naming
from .errors import GGUFFileError

__all__ = [
    "check_t5_fits",
    "check_transformer_fits",
    "load_gguf_t5",
    "load_gguf_transformer",
    "read_gguf",
    "read_tensors",
]

_FLOATS = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


def _supported_types() -> set[gguf.GGMLQuantizationType]:
    # What diffusers' GGUF dequantizer handles; transformers' (gguf-py's numpy) handles a superset.
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return _FLOATS | set(SUPPORTED_GGUF_QUANT_TYPES)


# What the reader accepts before gguf-py parses the file. gguf-py builds Python objects for every
# metadata entry and every array item: 200,000 entries took 40 s and 650 MiB, a 2-million-item
# array 50 s and 2 GiB. Real files are far below: a FLUX transformer has ~20 entries and ~800
# tensors; a T5 encoder ~30 entries, ~220 tensors and ~330,000 array items (its vocabulary three
# times over and the SentencePiece charsmap).
MAX_METADATA_ENTRIES = 1024
MAX_TENSORS = 65_536
MAX_ARRAY_ITEMS = 1 << 19  # all arrays together
MAX_STRING_BYTES = 16 << 20
_FIXED_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> bytes
_STRING, _ARRAY = 8, 9


def _check_header_bounds(path: Path) -> None:
    """Walk the GGUF header's counts and metadata (lengths only, nothing decoded) and refuse a
    file beyond the bounds above before gguf-py spends minutes and gigabytes on it.

    Hand-written because gguf-py has no limits to set; it reads only what the GGUF spec (v2/v3)
    puts before the tensor infos.
    """
    import struct

    with path.open("rb") as f:

        def take(fmt: str):
            size = struct.calcsize("<" + fmt)
            data = f.read(size)
            if len(data) < size:
                raise GGUFFileError(path, "truncated GGUF file (the metadata ends early)")
            return struct.unpack("<" + fmt, data)

        def skip_string(what: str) -> None:
            (length,) = take("Q")
            if length > MAX_STRING_BYTES:
                raise GGUFFileError(path, f"{what}: a {length}-byte string (limit {MAX_STRING_BYTES})")
            f.seek(length, 1)

        items = 0

        def skip_value(kind: int, what: str, depth: int = 0) -> None:
            nonlocal items
            if kind in _FIXED_SIZES:
                f.seek(_FIXED_SIZES[kind], 1)
            elif kind == _STRING:
                skip_string(what)
            elif kind == _ARRAY and depth < 2:
                item_kind, count = take("IQ")
                items += count
                if items > MAX_ARRAY_ITEMS:
                    raise GGUFFileError(path, f"metadata arrays hold more than {MAX_ARRAY_ITEMS} items (at {what})")
                if item_kind in _FIXED_SIZES:
                    f.seek(count * _FIXED_SIZES[item_kind], 1)
                else:
                    for _ in range(count):
                        skip_value(item_kind, what, depth + 1)
            else:
                raise GGUFFileError(path, f"{what}: unknown or too deeply nested metadata type {kind}")

        magic, version = f.read(4), take("I")[0]
        if magic != b"GGUF":
            raise GGUFFileError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        if version not in (2, 3):
            raise GGUFFileError(path, f"GGUF version {version} is not supported (2 or 3)")
        tensors, entries = take("QQ")
        if tensors > MAX_TENSORS:
            raise GGUFFileError(path, f"{tensors} tensors; a FLUX or T5 file has at most {MAX_TENSORS}")
        if entries > MAX_METADATA_ENTRIES:
            raise GGUFFileError(path, f"{entries} metadata entries; the limit is {MAX_METADATA_ENTRIES}")
        for i in range(entries):
            skip_string(f"metadata entry {i}")
            skip_value(take("I")[0], f"metadata entry {i}")


def read_gguf(path: str | Path, architectures: tuple[str, ...]) -> gguf.GGUFReader:
    """Open and check a GGUF file: magic, bounded metadata, complete data, architecture,
    supported tensor types."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFileError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    _check_header_bounds(path)
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf-py reports a short file as reshape/index errors
        raise GGUFFileError(path, f"corrupt or truncated GGUF file ({type(e).__name__}: {e})") from None
    if not reader.tensors:
        raise GGUFFileError(path, "GGUF file holds no tensors")
    size = path.stat().st_size
    end = max(int(t.data_offset) + int(t.n_bytes) for t in reader.tensors)
    if end > size:
        raise GGUFFileError(path, f"truncated GGUF file: {size} bytes, its tensors need {end}")
    field = reader.fields.get("general.architecture")
    arch = field.contents() if field is not None else None
    if arch not in architectures:
        raise GGUFFileError(path, f"wrong architecture {arch!r}, expected {' or '.join(map(repr, architectures))}")
    supported = _supported_types()
    for t in reader.tensors:
        if t.tensor_type not in supported:
            names = ", ".join(sorted(q.name for q in supported))
            reason = f"tensor {t.name!r} has quant type {t.tensor_type.name}, which cannot be loaded"
            raise GGUFFileError(path, f"{reason} (supported: {names})")
    return reader


def read_tensors(path: Path, reader: gguf.GGUFReader) -> dict[str, torch.Tensor]:
    """The file's tensors as diffusers' `load_gguf_checkpoint` returns them (a `GGUFParameter` of
    raw blocks for a quantized tensor, a plain tensor for F32/F16), each read from the file into
    its own freshly allocated buffer.

    Hand-written for memory: `load_gguf_checkpoint` copies every tensor out of gguf-py's memory
    map, so the mapped file pages it touched count in the process's RSS next to the copies (FLUX.1-dev's
    11.8 GiB Q8_0 file peaked at 1.64x its size on a CPU). Read this way the file passes through the
    page cache only (shared and reclaimable, not this process's memory), and the load peaks at the
    weights themselves. `reader` (already checked) gives only offsets, shapes and types here.
    """
    from diffusers.quantizers.gguf.utils import GGUFParameter

    tensors: dict[str, torch.Tensor] = {}
    with path.open("rb", buffering=0) as f:
        for t in reader.tensors:
            # shape and dtype of gguf-py's view (raw bytes per row for quantized types), no page touched
            array = np.empty(t.data.shape, dtype=t.data.dtype)
            buffer, offset = memoryview(array).cast("B"), int(t.data_offset)
            while buffer:
                got = os.preadv(f.fileno(), [buffer], offset)
                if got <= 0:
                    raise GGUFFileError(path, f"truncated GGUF file: tensor {t.name!r} ends early")
                buffer, offset = buffer[got:], offset + got
            weights = torch.from_numpy(array)
            tensors[t.name] = weights if t.tensor_type in _FLOATS else GGUFParameter(weights, quant_type=t.tensor_type)
    return tensors


def _component(model_folder: str | Path, subfolder: str) -> tuple[Path, str | None]:
    """(folder, subfolder) holding the component's config.json: a model root or the component itself."""
    root = Path(model_folder)
    if (root / subfolder / "config.json").is_file():
        return root, subfolder
    if (root / "config.json").is_file():
        return root, None
    raise NotFound(f"{root}: no {subfolder}/config.json (a diffusers model folder is needed for the config)")


def _logical_shape(tensor) -> tuple[int, ...]:
    return tuple(getattr(tensor, "quant_shape", tensor.shape))


def _check_fits(path: Path, state_dict: dict, config: dict) -> None:
    """Same tensor names and shapes as the model the folder's config describes."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    with init_empty_weights():
        expected = {k: tuple(v.shape) for k, v in FluxTransformer2DModel.from_config(config).state_dict().items()}
    missing, extra = sorted(expected.keys() - state_dict.keys()), sorted(state_dict.keys() - expected.keys())
    if missing or extra:
        reason = f"missing {missing[:5]}, unexpected {extra[:5]}"
        raise GGUFFileError(path, f"does not fit the model folder's transformer: {reason}")
    for key, shape in expected.items():
        if _logical_shape(state_dict[key]) != shape:
            got = _logical_shape(state_dict[key])
            raise GGUFFileError(path, f"tensor {key!r} has shape {got}, the model folder's transformer needs {shape}")


def _to_diffusers_names(path: Path, state_dict: dict, config: dict) -> dict:
    if not naming.is_bfl_naming(state_dict):
        return state_dict
    inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
    try:
        return naming.bfl_to_diffusers(state_dict, inner_dim)
    except KeyError as e:
        raise GGUFFileError(path, e.args[0]) from None
    except RuntimeError as e:  # torch.split: rows do not add up for this width
        raise GGUFFileError(path, f"BFL tensors do not split for inner_dim {inner_dim} ({e})") from None


def check_transformer_fits(gguf_file: str | Path, model_folder: str | Path) -> gguf.GGUFReader:
    """Everything `load_gguf_transformer` checks, from the file's header alone (no tensor data
    read): the GGUF is sound and its tensors, as named and shaped, are the model folder's
    transformer. `fluxmesh plan` and `serve denoiser` both ask this, so they cannot disagree."""
    path = Path(gguf_file)
    reader = read_gguf(path, ("flux",))
    from diffusers import FluxTransformer2DModel  # after the file checks: a bad file is refused at once

    folder, subfolder = _component(model_folder, "transformer")
    config = FluxTransformer2DModel.load_config(folder, subfolder=subfolder, local_files_only=True)
    # Shapes as diffusers' loader sees them (GGUF stores dims innermost first); meta tensors
    # carry them through the same BFL->diffusers split the loader makes.
    shapes = {t.name: torch.empty(tuple(int(n) for n in reversed(t.shape)), device="meta") for t in reader.tensors}
    _check_fits(path, _to_diffusers_names(path, shapes, config), config)
    return reader


def load_gguf_transformer(
    gguf_file: str | Path,
    model_folder: str | Path,
    compute_dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """A `FluxTransformer2DModel` with GGUF weights (kept quantized, dequantized per matmul in
    `compute_dtype`), its config from `model_folder` (model root or its transformer/ folder).

    Works for BFL-named (community) and diffusers-named files. Offline: nothing is fetched.
    """
    path = Path(gguf_file)
    reader = check_transformer_fits(path, model_folder)  # before gigabytes of tensor data are read
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    folder, subfolder = _component(model_folder, "transformer")
    config = FluxTransformer2DModel.load_config(folder, subfolder=subfolder, local_files_only=True)
    state_dict = _to_diffusers_names(path, read_tensors(path, reader), config)
    del reader  # its memory map of the whole file
    _check_fits(path, state_dict, config)  # the data's shapes are the header's; cheap to confirm
    model = FluxTransformer2DModel.from_single_file(
        state_dict,
        config=str(folder),
        subfolder=subfolder,
        quantization_config=GGUFQuantizationConfig(compute_dtype=compute_dtype),
        torch_dtype=compute_dtype,
        local_files_only=True,
        device=device,
    )
    return model.eval()


def check_t5_fits(gguf_file: str | Path, model_folder: str | Path):
    """What can be checked of a T5 GGUF without loading it: a sound file whose hyper-parameters
    are the model folder's T5's. Returns (the T5 folder, its config, the reader); `plan` asks it too."""
    from transformers import T5Config

    path = Path(gguf_file)
    reader = read_gguf(path, ("t5encoder", "t5"))
    folder, subfolder = _component(model_folder, "text_encoder_2")
    folder = folder / subfolder if subfolder else folder
    config = T5Config.from_pretrained(folder, local_files_only=True)
    arch = reader.fields["general.architecture"].contents()
    for key, attr in (("embedding_length", "d_model"), ("block_count", "num_layers"), ("feed_forward_length", "d_ff")):
        field = reader.fields.get(f"{arch}.{key}")
        if field is not None and field.contents() != getattr(config, attr):
            wanted = f"{attr}={getattr(config, attr)}"
            raise GGUFFileError(path, f"{arch}.{key} is {field.contents()}, the model folder's T5 has {wanted}")
    return folder, config, reader


def load_gguf_t5(gguf_file: str | Path, model_folder: str | Path, dtype: torch.dtype = torch.float32):
    """A `T5EncoderModel` from a t5encoder GGUF (city96 layout), config from `model_folder`
    (model root or its text_encoder_2/ folder). Weights are dequantized to `dtype` at load."""
    from transformers import T5EncoderModel

    path = Path(gguf_file)
    folder, config, _ = check_t5_fits(path, model_folder)
    try:
        model, info = T5EncoderModel.from_pretrained(
            folder, gguf_file=str(path), config=config, dtype=dtype, local_files_only=True, output_loading_info=True
        )
    except RuntimeError as e:  # a shape mismatch surfaces as a state-dict size error
        raise GGUFFileError(path, f"does not fit the model folder's T5 encoder ({e})") from None
    missing = sorted(k for k in info["missing_keys"] if k != "encoder.embed_tokens.weight")
    if missing or info["mismatched_keys"]:
        reason = f"missing {missing[:5]}, mismatched {sorted(info['mismatched_keys'])[:5]}"
        raise GGUFFileError(path, f"does not fit the model folder's T5 encoder: {reason}")
    return model.eval()
