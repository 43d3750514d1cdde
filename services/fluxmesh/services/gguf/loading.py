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
* transformers rebuilds a T5 config from GGUF metadata with `feed_forward_proj="relu"` (the
  metadata cannot say "gated-gelu"), so T5 v1.1 / FLUX's encoder would silently compute with the
  wrong activation. The config is always taken from the model folder.
* transformers' GGUF loading dequantizes T5 weights to `dtype` at load time (it keeps only some
  LLM architectures packed); the memory win of a T5 GGUF is on disk and in download, not in RAM.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import torch

from fluxmesh.rpc.errors import NotFound

from . import naming
from .errors import GGUFFileError

__all__ = ["load_gguf_t5", "load_gguf_transformer", "read_gguf"]

_FLOATS = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16}


def _supported_types() -> set[gguf.GGMLQuantizationType]:
    # What diffusers' GGUF dequantizer handles; transformers' (gguf-py's numpy) handles a superset.
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    return _FLOATS | set(SUPPORTED_GGUF_QUANT_TYPES)


def read_gguf(path: str | Path, architectures: tuple[str, ...]) -> gguf.GGUFReader:
    """Open and check a GGUF file: magic, complete data, architecture, supported tensor types."""
    path = Path(path)
    if not path.is_file():
        raise NotFound(f"{path}: no such GGUF file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFFileError(path, f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
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
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig
    from diffusers.models.model_loading_utils import load_gguf_checkpoint

    path = Path(gguf_file)
    read_gguf(path, ("flux",))
    folder, subfolder = _component(model_folder, "transformer")
    config = FluxTransformer2DModel.load_config(folder, subfolder=subfolder, local_files_only=True)
    state_dict = load_gguf_checkpoint(str(path))
    if naming.is_bfl_naming(state_dict):
        inner_dim = config["num_attention_heads"] * config["attention_head_dim"]
        try:
            state_dict = naming.bfl_to_diffusers(state_dict, inner_dim)
        except KeyError as e:
            raise GGUFFileError(path, e.args[0]) from None
        except RuntimeError as e:  # torch.split: rows do not add up for this width
            raise GGUFFileError(path, f"BFL tensors do not split for inner_dim {inner_dim} ({e})") from None
    _check_fits(path, state_dict, config)
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


def load_gguf_t5(gguf_file: str | Path, model_folder: str | Path, dtype: torch.dtype = torch.float32):
    """A `T5EncoderModel` from a t5encoder GGUF (city96 layout), config from `model_folder`
    (model root or its text_encoder_2/ folder). Weights are dequantized to `dtype` at load."""
    from transformers import T5Config, T5EncoderModel

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
