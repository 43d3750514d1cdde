"""The one error type of this package: a model file fluxmesh cannot use, and why."""

from __future__ import annotations

from pathlib import Path

from fluxmesh.rpc.errors import FailedPrecondition

__all__ = ["GGUFFileError"]


class GGUFFileError(FailedPrecondition):
    """A GGUF (or source weights) file that is not GGUF, is cut short, has the wrong architecture,
    an unsupported quant type or tensors that do not fit the model. Travels as FAILED_PRECONDITION."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = Path(path)
        self.reason = reason
