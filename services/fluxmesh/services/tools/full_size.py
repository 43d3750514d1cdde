"""FLUX.1-dev-sized model folders, offline: the real configs with random or empty weights.

    write_full_size_model(path)                      # random weights: ~34 GB written (bf16)
    write_full_size_model(path, weights="sparse")    # same files, all zeros, as sparse files

Nothing can be downloaded here, yet memory planning and the GPU benchmark need FLUX.1-dev's real
shapes. The configs below are FLUX.1-dev's own (black-forest-labs/FLUX.1-dev: transformer,
CLIP-L text_encoder, T5-XXL text_encoder_2, vae, scheduler config files); tensor names and shapes
come from the diffusers/transformers classes built from them on the meta device, so the files
load with the ordinary `from_pretrained` code. Tokenizers are the tiny model's (ids stay within
the real vocabularies).

* `weights="random"`: values drawn tensor by tensor (N(0, 1/fan_in) for matrices, ones for
  norm scales, zeros for biases) so activations stay finite through every layer, written in
  ~5 GB shards with the index files the loaders expect. `device="cuda"` draws them on a GPU.
* `weights="sparse"`: the safetensors header and a file of the right length that holds no
  data blocks: gigabytes on paper, nothing on disk. For `fluxmesh plan`, which reads headers.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

__all__ = ["DEV_CONFIGS", "write_full_size_model"]

# FLUX.1-dev's configs (the fields its config.json files set; the rest are the classes' defaults).
DEV_CONFIGS = {
    "transformer": {
        "attention_head_dim": 128,
        "axes_dims_rope": [16, 56, 56],
        "guidance_embeds": True,
        "in_channels": 64,
        "joint_attention_dim": 4096,
        "num_attention_heads": 24,
        "num_layers": 19,
        "num_single_layers": 38,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    },
    "vae": {
        "act_fn": "silu",
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": 0.3611,
        "shift_factor": 0.1159,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
        "force_upcast": True,
    },
    "text_encoder": {  # CLIP ViT-L/14 text tower
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
        "bos_token_id": 0,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "text_encoder_2": {  # T5 v1.1 XXL encoder
        "vocab_size": 32128,
        "d_model": 4096,
        "d_kv": 64,
        "d_ff": 10240,
        "num_layers": 24,
        "num_heads": 64,
        "relative_attention_num_buckets": 32,
        "relative_attention_max_distance": 128,
        "feed_forward_proj": "gated-gelu",
        "dense_act_fn": "gelu_new",
        "is_gated_act": True,
        "tie_word_embeddings": False,
        "layer_norm_epsilon": 1e-6,
    },
}
_SHARD_BYTES = 5 * 10**9
_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


def write_full_size_model(
    path: str | Path,
    *,
    weights: str = "random",
    dtype: str = "bfloat16",
    device: str = "cpu",
    seed: int = 0,
    configs: dict | None = None,
) -> Path:
    """Write a FLUX.1-dev-sized model folder at `path` and return it. `configs` overrides parts
    of DEV_CONFIGS (e.g. fewer layers for a quick check of the same code path)."""
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxmesh.services.tools.tiny_model import write_tiny_model

    if weights not in ("random", "sparse"):
        raise ValueError(f"weights={weights!r}: choose random or sparse")
    configs = {name: {**config, **(configs or {}).get(name, {})} for name, config in DEV_CONFIGS.items()}
    root = Path(path)
    write_tiny_model(root, seed=seed)  # tokenizers, scheduler, model_index.json: the real layout
    torch_dtype = getattr(torch, dtype)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.device("meta"):
        models = {
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
            "text_encoder_2": T5EncoderModel(T5Config(**configs["text_encoder_2"])),
            "transformer": FluxTransformer2DModel(**configs["transformer"]),
            "vae": AutoencoderKL(**configs["vae"]),
        }
    for name, model in models.items():
        folder = root / name
        shutil.rmtree(folder)
        folder.mkdir()
        if hasattr(model, "save_config"):
            model.save_config(folder)  # diffusers
            stem = "diffusion_pytorch_model"
        else:
            model.config.torch_dtype = torch_dtype
            model.config.save_pretrained(folder)  # transformers
            stem = "model"
        shapes = _tensor_shapes(model)
        if weights == "sparse":
            _write_sparse(folder, stem, shapes, _DTYPE_NAMES[dtype], torch_dtype.itemsize)
        else:
            _write_random(folder, stem, shapes, torch_dtype, generator, device)
    return root


def _tensor_shapes(model) -> dict[str, tuple[int, ...]]:
    """What the checkpoint holds: parameters once each (tied ones share), persistent buffers."""
    state = model.state_dict()
    unique = dict(model.named_parameters())
    every = dict(model.named_parameters(remove_duplicate=False))
    return {key: tuple(value.shape) for key, value in state.items() if key in unique or key not in every}


def _shards(shapes: dict[str, tuple[int, ...]], itemsize: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = math.prod(shape) * itemsize
        if current and size + nbytes > _SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    return shards + [current]


def _file_names(stem: str, count: int) -> list[str]:
    if count == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def _write_index(folder: Path, stem: str, shards: list[list[str]], names: list[str], total: int) -> None:
    if len(shards) > 1:
        weight_map = {key: name for keys, name in zip(shards, names) for key in keys}
        (folder / f"{stem}.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )


def _random_tensor(key: str, shape: tuple[int, ...], dtype, generator, device):
    import torch

    if key.endswith("bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1:
        return torch.ones(shape, dtype=dtype)  # norm scales
    fan_in = math.prod(shape[1:])
    values = torch.randn(shape, generator=generator, device=device, dtype=torch.float32) / math.sqrt(fan_in)
    return values.to(dtype).cpu()


def _write_random(folder: Path, stem: str, shapes: dict, dtype, generator, device: str) -> None:
    from safetensors.torch import save_file

    shards = _shards(shapes, dtype.itemsize)
    names = _file_names(stem, len(shards))
    for keys, name in zip(shards, names):
        tensors = {key: _random_tensor(key, shapes[key], dtype, generator, device) for key in keys}
        save_file(tensors, folder / name, metadata={"format": "pt"})
        del tensors
    _write_index(folder, stem, shards, names, sum(math.prod(s) for s in shapes.values()) * dtype.itemsize)


def _write_sparse(folder: Path, stem: str, shapes: dict, dtype_name: str, itemsize: int) -> None:
    """A safetensors file written by hand: an 8-byte header length, the JSON header, then the
    data region, here only reserved with truncate() (a sparse file) instead of written."""
    shards = _shards(shapes, itemsize)
    names = _file_names(stem, len(shards))
    for keys, name in zip(shards, names):
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            nbytes = math.prod(shapes[key]) * itemsize
            header[key] = {"dtype": dtype_name, "shape": list(shapes[key]), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data region starts 8-byte aligned
        with (folder / name).open("wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)
    _write_index(folder, stem, shards, names, sum(math.prod(s) for s in shapes.values()) * itemsize)
