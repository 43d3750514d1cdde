"""FLUX.1 Control LoRAs (FLUX.1-Canny-dev-lora, FLUX.1-Depth-dev-lora) on a base FLUX.1 model.

Such a LoRA's `x_embedder` takes twice the packed channels (latents + control-image latents,
FluxControlPipeline's channel concat), and it carries new q/k norm scales. diffusers'
`FluxControlPipeline.load_lora_weights` widens the transformer's `x_embedder` for it (zero
columns for the control half, `config.in_channels` doubled), pads the LoRA to fit, and writes
the norm scales into the model; this does the same, with diffusers' own functions, and then fuses
the adapter into the weights: the widened model is from then on the denoiser's base model, to
which the per-request LoRAs (loras/) stack as on FLUX.1-Canny-dev itself, and it is made again
each time the stage reads its transformer (sequential mode's release and load).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from safetensors import safe_open

from fluxmesh.rpc.errors import InvalidArgument

__all__ = ["ControlLora"]

log = logging.getLogger(__name__)

# The input layer in diffusers' naming and in BFL's (the checkpoints BFL publishes; diffusers converts them).
_X_EMBEDDER_A = ("x_embedder.lora_A.weight", "img_in.lora_A.weight")
_ADAPTER = "fluxmesh_control_lora"


class ControlLora:
    """One Control LoRA file, checked at start and applied to each transformer the stage reads."""

    def __init__(self, path: Path, *, in_channels: int, out_channels: int):
        if path.suffix != ".safetensors" or not path.is_file():
            raise InvalidArgument("control_lora", f"{path}: expected a .safetensors file (nothing is unpickled)")
        with safe_open(str(path), "pt") as tensors:  # the header only: shapes, no weights read
            widths = [tensors.get_slice(k).get_shape()[1] for k in tensors.keys() if k.endswith(_X_EMBEDDER_A)]
        if widths != [2 * out_channels] or in_channels != out_channels:
            raise InvalidArgument(
                "control_lora",
                f"{path.name}: not a Control LoRA for this model: its x_embedder takes {widths or 'nothing'}, "
                f"a Control LoRA on a {in_channels}-channel base takes {2 * out_channels}",
            )
        self.path = path
        self.in_channels = widths[0]

    def apply(self, transformer) -> None:
        """Widen, load and fuse, as FluxControlPipeline.load_lora_weights then fuse_lora."""
        from diffusers import FluxControlPipeline

        with torch.inference_mode(False):
            state_dict, alphas, metadata = FluxControlPipeline.lora_state_dict(
                str(self.path), return_alphas=True, return_lora_metadata=True
            )
            lora = {k: v for k, v in state_dict.items() if k.startswith("transformer.") and "lora" in k}
            norms = {
                k: state_dict.pop(k)
                for k in list(state_dict)
                if k.startswith("transformer.")
                and any(n in k for n in FluxControlPipeline._control_lora_supported_norm_keys)
            }
            FluxControlPipeline._maybe_expand_transformer_param_shape_or_error_(transformer, lora, norms)
            state_dict.update(FluxControlPipeline._maybe_expand_lora_state_dict(transformer, lora))
            FluxControlPipeline.load_lora_into_transformer(
                state_dict, network_alphas=alphas, transformer=transformer, adapter_name=_ADAPTER, metadata=metadata
            )
            if norms:
                FluxControlPipeline._load_norm_into_transformer(
                    norms, transformer=transformer, discard_original_layers=True
                )
            transformer.fuse_lora(adapter_names=[_ADAPTER])
            transformer.unload_lora()  # the fused weights stay; the per-request LoRAs start from them
        log.info("control LoRA %s fused: x_embedder takes %d channels", self.path.name, transformer.config.in_channels)
