"""Numpy encoders for the K-quants Q4_K, Q5_K and Q6_K.

gguf-py 0.19 can *read* every K-quant but *write* none (`gguf.quants.quantize` raises
NotImplementedError for them; llama.cpp does it in C). These encoders produce blocks in exactly the
layout that `gguf.quants.dequantize`, diffusers' GGUF dequantizer and llama.cpp decode; each is the
bit-for-bit inverse of gguf-py's decoder for the same layout. They use the plain min/max scale
search, not llama.cpp's iterative refinement, so a file differs in bytes from llama-quantize's
(its error is a little larger, well within one K-quant level); Q2_K/Q3_K are not written.

Super-block: 256 values (`QK_K`). Q4_K/Q5_K: 8 sub-blocks of 32 with 6-bit scale and min under
fp16 `d`/`dmin`: x ~ d*sc*q - dmin*m. Q6_K: 16 sub-blocks of 16 with int8 scales under fp16 `d`:
x ~ d*sc*(q-32).
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK_K = 256

__all__ = ["KQUANT_ENCODERS", "QK_K"]


def _f16(x: np.ndarray) -> np.ndarray:
    """Round to fp16 and back: later math must use the scale the file will hold."""
    return x.astype(np.float16).astype(np.float32)


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b == 0, 0.0, a / np.where(b == 0, 1.0, b))


def _scales_mins(blocks: np.ndarray, levels: int):
    """Affine 6-bit scales and mins for (n, 8, 32) sub-blocks, and the integer codes."""
    lo = np.minimum(blocks.min(axis=-1), 0.0)  # min is stored as a positive offset, so clamp at 0
    hi = blocks.max(axis=-1)
    scale = (hi - lo) / levels
    mins = -lo
    d = _f16(scale.max(axis=-1, keepdims=True) / 63)
    dmin = _f16(mins.max(axis=-1, keepdims=True) / 63)
    sc = np.clip(np.rint(_safe_div(scale, d)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_safe_div(mins, dmin)), 0, 63).astype(np.uint8)
    step = (d * sc)[..., None]
    offset = (dmin * m)[..., None]
    q = np.clip(np.rint(_safe_div(blocks + offset, step)), 0, levels).astype(np.uint8)
    return d, dmin, sc, m, q


def _pack_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """8 six-bit scales + 8 six-bit mins -> 12 bytes (layout of gguf-py's `Q4_K.get_scale_min`)."""
    lo_sc, hi_sc = sc[:, :4], sc[:, 4:]
    lo_m, hi_m = m[:, :4], m[:, 4:]
    return np.concatenate(
        [
            lo_sc | ((hi_sc >> 4) << 6),
            lo_m | ((hi_m >> 4) << 6),
            (hi_sc & 0x0F) | ((hi_m & 0x0F) << 4),
        ],
        axis=1,
    ).astype(np.uint8)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 8, 32) 4-bit codes -> (n, 128): sub-block 2g in the low nibble, 2g+1 in the high."""
    q = q.reshape(-1, 4, 2, 32) & 0x0F
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128).astype(np.uint8)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(-1, 2)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scales_mins(blocks.reshape(-1, 8, 32), 15)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(sc, m), _nibbles(q)], axis=1)


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _scales_mins(blocks.reshape(-1, 8, 32), 31)
    high = (q >> 4) & 1  # bit j of qh[l] is the fifth bit of sub-block j, element l
    qh = (high << np.arange(8, dtype=np.uint8)[None, :, None]).sum(axis=1, dtype=np.uint8)
    return np.concatenate([_fp16_bytes(d), _fp16_bytes(dmin), _pack_scales(sc, m), qh, _nibbles(q)], axis=1)


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    x = blocks.reshape(-1, 16, 16)
    # signed sub-block scale that maps the largest-magnitude value to -32, the end of [-32, 31]
    idx = np.abs(x).argmax(axis=-1)[..., None]
    extreme = np.take_along_axis(x, idx, axis=-1)[..., 0]
    scale = extreme / -32.0
    d = _f16(np.abs(scale).max(axis=-1, keepdims=True) / 127)
    sc = np.clip(np.rint(_safe_div(scale, d)), -128, 127).astype(np.int8)
    step = (d * sc)[..., None]
    q = (np.clip(np.rint(_safe_div(x, step)), -32, 31) + 32).astype(np.uint8).reshape(-1, 256)
    low = (q & 0x0F).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (q >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    return np.concatenate([ql, qh, sc.view(np.uint8), _fp16_bytes(d)], axis=1).astype(np.uint8)


# qtype -> encoder of (n_blocks, 256) float32 -> (n_blocks, type_size) uint8
KQUANT_ENCODERS = {Q.Q4_K: quantize_q4_k, Q.Q5_K: quantize_q5_k, Q.Q6_K: quantize_q6_k}
