"""A tiny XLabs FLUX IP-Adapter and the CLIP vision model it takes embeds from, in their real layouts.

XLabs-AI/flux-ip-adapter ships one `ip_adapter.safetensors` with their own key names, which
diffusers' `FluxIPAdapterMixin.load_ip_adapter` converts as it reads:

    ip_adapter_proj_model.proj.{weight,bias}    (tokens x T5 width, CLIP projection_dim)  -> ImageProjection
    ip_adapter_proj_model.norm.{weight,bias}    (T5 width)
    double_blocks.{i}.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}
                                                (inner_dim, T5 width), one per double block -> to_{k,v}_ip

and the image encoder is openai/clip-vit-large-patch14's vision tower, a
`CLIPVisionModelWithProjection` folder (config.json, model.safetensors, preprocessor_config.json).
Written here with the widths of `write_tiny_model`'s model of the same size, so they go together.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["IP_ADAPTER_FILE", "IMAGE_ENCODER_FOLDER", "write_tiny_ip_adapter"]

IP_ADAPTER_FILE = "ip_adapter.safetensors"  # the name XLabs publishes it under
IMAGE_ENCODER_FOLDER = "image_encoder"
_IMAGE_TOKENS = 4  # XLabs' adapter: 4 image tokens (diffusers infers 16 only from a 65536-row projection)


def write_tiny_ip_adapter(path: str | Path, *, size: str = "tiny", seed: int = 0, t5_width: int | None = None) -> Path:
    """`path/ip_adapter.safetensors` (for `serve denoiser --ip-adapter`) and `path/image_encoder/`
    (for `serve encoder --ip-adapter-image-encoder`); returns `path`."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from fluxmesh.services.tools.tiny_model import _DIMS, ModelSize, _save, vision_tower

    dims = _DIMS[ModelSize(size)]
    width = t5_width or dims.t5_width  # the adapter's keys and values read T5-width image tokens
    inner = dims.heads * dims.head_dim
    projection_dim = dims.text_width * 3 // 4  # unlike every other width here, so a mix-up fails loudly
    tower = vision_tower(size)
    image_size = tower["image_size"]
    root = Path(path)
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    vision = CLIPVisionModelWithProjection(
        CLIPVisionConfig(**tower, projection_dim=projection_dim, hidden_act="quick_gelu")
    )
    _save(vision, root / IMAGE_ENCODER_FOLDER)
    # As the real folder has one; diffusers makes its own CLIPImageProcessor(size=image_size) instead.
    CLIPImageProcessor(size=image_size, crop_size=image_size).save_pretrained(root / IMAGE_ENCODER_FOLDER)

    def linear(rows: int, columns: int) -> dict[str, torch.Tensor]:
        layer = torch.nn.Linear(columns, rows)
        return {"weight": layer.weight.detach().clone(), "bias": layer.bias.detach().clone()}

    tensors: dict[str, torch.Tensor] = {}
    for name, value in linear(_IMAGE_TOKENS * width, projection_dim).items():
        tensors[f"ip_adapter_proj_model.proj.{name}"] = value
    tensors["ip_adapter_proj_model.norm.weight"] = 1.0 + 0.1 * torch.randn(width)
    tensors["ip_adapter_proj_model.norm.bias"] = 0.1 * torch.randn(width)
    for block in range(dims.double_blocks):
        for kind in ("k", "v"):
            for name, value in linear(inner, width).items():
                tensors[f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj.{name}"] = value
    save_file(tensors, root / IP_ADAPTER_FILE)
    return root
