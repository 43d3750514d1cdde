"""Tiny random-weight FLUX ControlNets in the layouts their authors publish as diffusers folders.

A `FluxControlNetModel` folder (`config.json` + `diffusion_pytorch_model.safetensors`) for a base
model that `write_tiny_model` writes at the same size:

    instantx  InstantX/FLUX.1-dev-Controlnet-Canny: double and single blocks, the control image
              as VAE latents (controlnet_x_embedder)
    union     InstantX/FLUX.1-dev-Controlnet-Union, Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro:
              the same plus a mode embedding (num_mode 10), one mode token before the text
    xlabs     XLabs-AI/flux-controlnet-*-diffusers: double blocks only, the control image as pixels
              through an input_hint_block (conditioning_embedding_channels 16, patch_size 2)

diffusers initialises a ControlNet's output projections (and InstantX's control embedder) to
zero, so that training starts from the base model; a ControlNet written so would change nothing
and prove nothing. Here they are random like every other weight.
"""

from __future__ import annotations

from pathlib import Path

from fluxmesh.services.tools.tiny_model import _DIMS, ModelSize, _save

__all__ = ["LAYOUTS", "write_tiny_controlnet"]

LAYOUTS = ("instantx", "union", "xlabs")
UNION_MODES = 10  # InstantX Union and Shakker Union Pro: canny, tile, depth, blur, pose, gray, low quality, ...

# Parameters diffusers zero-initialises (zero_module): randomised so the ControlNet acts.
_ZERO_INITIALISED = ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_x_embedder.", "input_hint_block.")


def write_tiny_controlnet(
    path: str | Path,
    layout: str,
    *,
    size: ModelSize | str = ModelSize.tiny,
    seed: int = 0,
    schnell: bool = False,
    t5_width: int | None = None,
) -> Path:
    """Write a FluxControlNetModel folder of `layout` (see LAYOUTS) at `path` and return it."""
    import torch
    from diffusers import FluxControlNetModel

    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    dims = _DIMS[ModelSize(size)]
    xlabs = layout == "xlabs"
    # The real ones' share of the transformer's blocks (InstantX, Unions: 5 of 19 double and 10 of
    # 38 single; XLabs: 2 double of 19), at least one: what a ControlNet's forward costs beside it.
    double = max(1, dims.double_blocks // (8 if xlabs else 4))
    single = 0 if xlabs else max(1, dims.single_blocks // 4)
    torch.manual_seed(seed + 1)  # not the transformer's own draws
    controlnet = FluxControlNetModel(
        patch_size=2 if xlabs else 1,  # XLabs: the hint block's 16 channels, 2x2-patched to the 64 latent features
        in_channels=64,
        num_layers=double,
        num_single_layers=single,
        attention_head_dim=dims.head_dim,
        num_attention_heads=dims.heads,
        joint_attention_dim=t5_width or dims.t5_width,
        pooled_projection_dim=dims.text_width,
        guidance_embeds=not schnell,
        axes_dims_rope=list(dims.rope),
        num_mode=UNION_MODES if layout == "union" else None,
        conditioning_embedding_channels=16 if xlabs else None,
    )
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(_ZERO_INITIALISED):
                parameter.normal_(0.0, 0.2)
    root = Path(path)
    _save(controlnet, root)
    return root
