"""torch.Tensor <-> fluxmesh.v1.Tensor, checked on the way in.

Bytes move as a uint8 view of the tensor and back through `torch.frombuffer`, never through a
numpy array of the tensor's own dtype, because numpy has no bfloat16. Every decoded tensor is checked against what the receiving stage expects, and a
mismatch is an `InvalidArgument` naming the field, before any model runs.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from fluxmesh.contract import WIRE_DTYPES
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import common_pb2

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPES}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

# A decoded tensor may not be larger than this: a hostile shape must not allocate a host.
MAX_TENSOR_BYTES = 1 << 30


def to_pb(tensor: torch.Tensor) -> common_pb2.Tensor:
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype not in DTYPE_NAMES:
        tensor = tensor.float()
    # One memcpy: reinterpret the elements as bytes (any dtype, bf16 included), then copy out.
    raw = tensor.reshape(-1).view(torch.uint8)
    if sys.byteorder != "little":  # the wire is little-endian
        raw = raw.reshape(-1, tensor.element_size()).flip(-1).reshape(-1)
    data = raw.numpy().tobytes()
    return common_pb2.Tensor(dtype=DTYPE_NAMES[tensor.dtype], shape=list(tensor.shape), data=data)


def from_pb(
    message: common_pb2.Tensor,
    field: str,
    *,
    ndim: int | None = None,
    finite: bool = True,
) -> torch.Tensor:
    """Decode `message`, raising `InvalidArgument(field, ...)` for anything malformed."""
    if message.dtype not in DTYPES:
        raise InvalidArgument(f"{field}.dtype", f"unknown dtype {message.dtype!r}; expected one of {sorted(DTYPES)}")
    shape = list(message.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape", f"negative dimension in {shape}")
    if ndim is not None and len(shape) != ndim:
        raise InvalidArgument(f"{field}.shape", f"expected {ndim} dimensions, got {shape}")
    dtype = DTYPES[message.dtype]
    numel = 1
    for d in shape:
        numel *= d
    expected = numel * torch.empty((), dtype=dtype).element_size()
    if expected > MAX_TENSOR_BYTES:
        raise InvalidArgument(f"{field}.shape", f"{shape} would need {expected} bytes (limit {MAX_TENSOR_BYTES})")
    data = message.data  # every read of a bytes field copies it out of the message: read once
    if len(data) != expected:
        raise InvalidArgument(
            f"{field}.data", f"{len(data)} bytes do not match shape {shape} of {message.dtype} ({expected} bytes)"
        )
    if numel == 0:
        raise InvalidArgument(f"{field}.shape", f"empty tensor {shape}")
    if finite and _has_non_finite(data, message.dtype):
        raise InvalidArgument(f"{field}.data", "contains NaN or Inf")
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(shape)  # writable: the model owns it


# Exponent bits of each float format: all ones means Inf or NaN.
_EXPONENT_MASKS = {"bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00), "float32": (np.uint32, 0x7F800000)}


def _has_non_finite(data: bytes, dtype: str) -> bool:
    """NaN/Inf check on the raw bits with numpy, not `torch.isfinite`.

    This runs on the event loop's thread, and any multi-threaded torch kernel there would give
    that thread an OpenMP team of its own whose idle spinning slows the model thread's kernels
    by a third on a 2-core host (see fluxmesh.services.runtime.worker). numpy's elementwise ops are
    single-threaded, and reading bits needs no bfloat16 support.
    """
    if dtype not in _EXPONENT_MASKS:
        return False
    word, mask = _EXPONENT_MASKS[dtype]
    bits = np.frombuffer(data, dtype=np.dtype(word).newbyteorder("<"))
    return bool(np.any((bits & word(mask)) == word(mask)))
