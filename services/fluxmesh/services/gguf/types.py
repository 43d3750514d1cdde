"""The choices `fluxmesh quantize` offers, importable without torch, numpy or gguf (the CLI
builds its options from them)."""

from __future__ import annotations

from enum import Enum


class QuantType(str, Enum):
    """Types fluxmesh can write. All of them load through diffusers and transformers.

    Not offered: Q2_K/Q3_K (no encoder here; gguf-py 0.19 writes no K-quant at all, see
    `_kquants`), the IQ* types (need an importance matrix), TQ*/MXFP4/NVFP4 (diffusers cannot
    dequantize them).
    """

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K = "Q5_K"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_K = "Q4_K"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"

    @property
    def ggml(self):
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.value]


class Naming(str, Enum):
    bfl = "bfl"  # community files (city96 and others), what ComfyUI and diffusers' from_single_file read
    diffusers = "diffusers"  # diffusers' own parameter names


class Component(str, Enum):
    transformer = "transformer"
    t5 = "t5"  # the model folder's text_encoder_2
