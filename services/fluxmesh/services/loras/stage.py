"""LoRA support as a stage sees it: optional, validated up front, activated per request.

Both the encoder (CLIP-side keys) and the denoiser (transformer keys) hold one of these; a
stage started without a LoRA directory refuses requests that name LoRAs instead of silently
ignoring part of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fluxmesh.rpc.errors import FailedPrecondition, FluxmeshError
from fluxmesh.services.loras.activation import LoraActivator
from fluxmesh.services.loras.hotswap import HotswapActivator, check_stack
from fluxmesh.services.loras.library import LoraLibrary

LoraList = list[tuple[str, float]]


class StageLoras:
    def __init__(
        self,
        directory: str | Path | None,
        model: Any,
        component: str,
        *,
        max_cached: int = 8,
        hotswap_rank: int | None = None,
    ):
        """`hotswap_rank`: the model gets compiled, so LoRAs go into one hot-swap slot of that
        rank (hotswap.py) instead of an adapter each."""
        self.hotswap_rank = hotswap_rank
        self.library = LoraLibrary(directory, max_cached, components=(component,)) if directory else None
        self.activator: LoraActivator | HotswapActivator | None = None
        self.bind(model)

    def bind(self, model: Any) -> None:
        """Activate LoRAs on `model` from now on: a model whose weights were released and read
        again is a new module, and None (released) lets the old one be freed. Bind a model
        that gets compiled before compiling it (its hot-swap slot must be in the graph)."""
        if self.activator is not None:
            self.activator.close()  # it holds the model and the library holds it: let both go
            self.activator = None
        if self.library is not None and model is not None:
            if self.hotswap_rank is not None:
                self.activator = HotswapActivator(model, self.library, self.hotswap_rank)
            else:
                self.activator = LoraActivator(model, self.library)

    def check(self, loras: Sequence[tuple[str, float]], field: str = "loras") -> LoraList:
        """Names exist inside the directory, weights finite in [-4, 4]; cheap, no model work."""
        if not loras:
            return []
        if self.library is None:
            raise FailedPrecondition(f"{field}: this stage was started without --lora-dir")
        if self.hotswap_rank is not None:
            check_stack(len(loras), field)
        return self.library.check(loras, field=field)

    def activate(self, loras: LoraList) -> None:
        """Make exactly this set active (an empty list restores the base model bit for bit).
        Call on the model thread, right before the model runs."""
        if self.activator is not None:
            self.activator.activate(loras)

    def listing(self) -> list[tuple[str, int, bool]]:
        """(name, size in bytes, cached) for every LoRA file the stage can serve."""
        if self.library is None:
            return []
        cached = set(self.library.cached())
        listed = []
        for name in self.library.names():
            try:
                size = self.library.resolve(name).stat().st_size
            except (FluxmeshError, OSError):  # removed or changed since it was listed
                continue
            listed.append((name, size, name in cached))
        return listed
