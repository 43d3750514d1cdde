"""Where a stage runs: its device and dtype, and its CPU threads."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from fluxmesh.rpc.cores import CPU_SHARE_ENV, parse_share
from fluxmesh.rpc.errors import InvalidArgument

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Device:
    """The torch device and dtype a stage computes on."""

    torch_device: torch.device
    dtype: torch.dtype

    @classmethod
    def parse(cls, device: str = "auto", dtype: str = "auto") -> Device:
        """`auto` picks cuda:0 when there is one (else mps, else cpu); bf16 on accelerators, fp32 on CPU."""
        if device == "auto":
            device = "cuda:0" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
        try:
            resolved = torch.device(device)
        except RuntimeError as error:
            raise InvalidArgument("device", f"{device!r}: {error}") from None
        if resolved.type == "cuda" and not torch.cuda.is_available():
            raise InvalidArgument("device", f"{device!r}: CUDA is not available in this process")
        if dtype == "auto":
            return cls(resolved, torch.float32 if resolved.type == "cpu" else torch.bfloat16)
        if dtype not in _DTYPES:
            raise InvalidArgument("dtype", f"{dtype!r}; expected auto or one of {sorted(_DTYPES)}")
        return cls(resolved, _DTYPES[dtype])

    def describe(self) -> str:
        return f"{self.torch_device} {str(self.dtype).removeprefix('torch.')}"


# CPU threads of a stage computing on an accelerator: its CPU work is tensor copies, packing and
# previews, and idle OpenMP teams spin, taking cores from the stages that compute on the CPU.
ACCELERATOR_STAGE_THREADS = 2


def stage_threads(threads: int | None, device: Device, cpu_share: int | None = None) -> int | None:
    """The torch threads a stage runs with (None: torch's default, every core).

    An explicit `threads` wins; else the host share `fluxmesh up` gave it (fluxmesh.rpc.cores);
    a stage on an accelerator keeps at most ACCELERATOR_STAGE_THREADS either way."""
    if threads:
        return threads
    if device.torch_device.type == "cpu":
        return cpu_share
    return min(cpu_share or ACCELERATOR_STAGE_THREADS, ACCELERATOR_STAGE_THREADS)


def configure_threads(threads: int | None, device: Device) -> None:
    """Set this process's torch CPU threads: with several stage processes on one host, each
    must be told, or they fight for cores and every timing lies."""
    chosen = stage_threads(threads, device, parse_share(os.environ.get(CPU_SHARE_ENV)))
    if chosen:
        torch.set_num_threads(chosen)
