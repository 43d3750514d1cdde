"""GGUF for fluxmesh: write and load community-layout quantized FLUX transformers and T5 encoders.

    quantize_transformer(model_folder, "flux-Q8_0.gguf", "Q8_0")      # city96 layout, BFL names
    transformer = load_gguf_transformer("flux-Q8_0.gguf", model_folder)
    quantize_t5(model_folder, "t5-Q8_0.gguf", "Q8_0")
    text_encoder_2 = load_gguf_t5("t5-Q8_0.gguf", model_folder)

Bad files raise `GGUFFileError` (a FAILED_PRECONDITION fluxmesh error naming the file and reason).
Names resolve lazily, so importing `fluxmesh.services.gguf.cli` does not pull in torch.
"""

from __future__ import annotations

import importlib

__all__ = [
    "GGUFFileError",
    "Naming",
    "QuantType",
    "bfl_to_diffusers",
    "diffusers_to_bfl",
    "is_bfl_naming",
    "load_gguf_t5",
    "load_gguf_transformer",
    "quantize_cli",
    "quantize_t5",
    "quantize_transformer",
    "read_gguf",
    "transformer_gguf_size",
]

_HOME = {
    "GGUFFileError": "errors",
    "Naming": "types",
    "QuantType": "types",
    "bfl_to_diffusers": "naming",
    "diffusers_to_bfl": "naming",
    "is_bfl_naming": "naming",
    "load_gguf_t5": "loading",
    "load_gguf_transformer": "loading",
    "quantize_cli": "cli",
    "quantize_t5": "quantize",
    "quantize_transformer": "quantize",
    "read_gguf": "loading",
    "transformer_gguf_size": "quantize",
}


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)


def __dir__() -> list[str]:
    return sorted(__all__)
