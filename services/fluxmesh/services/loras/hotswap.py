"""LoRAs on a compiled transformer without recompiling: one hot-swap slot.

`activation.LoraActivator` gives every LoRA its own PEFT adapter and switches with
`set_adapters`/`disable_lora`, which changes what the compiled graph depends on (the active
adapter names, Python float scalings, the disabled flag): every switch would recompile. Here
the transformer gets, before it is compiled, one adapter — the slot — on every linear layer at
the declared maximum rank (`--max-lora-rank`), with zero weights; diffusers' hot-swap
(`enable_lora_hotswap(target_rank=...)` before that first adapter, then
`load_lora_adapter(..., hotswap=True)`) copies each request's LoRA into the slot's tensors in
place (a LoRA of lower rank is zero-padded, layers it does not touch are zeroed) and keeps the
scalings as tensors, so the graph never changes. The request's weight multiplies those scaling
tensors in place, as PEFT's `set_scale` would replace them. No LoRA is a slot of zeros: every
layer adds exactly 0 to its base output, so the base model's pixels, bit for bit.

What it costs and refuses (docs/benchmarks.md): every linear layer computes a rank-R product,
LoRA or not; one LoRA per request (one slot); a LoRA of rank above R, or whose alphas or ranks
differ between layers (diffusers' hot-swap refuses a different alpha pattern), is an
INVALID_ARGUMENT naming it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from fluxmesh.rpc.errors import InvalidArgument

from .activation import _adapter_mode, _TransformerOps
from .library import LoraLibrary, LoraWeights

__all__ = ["HotswapActivator", "check_stack"]

log = logging.getLogger(__name__)

SLOT = "fluxmesh_slot"


def check_stack(count: int, field: str = "loras") -> None:
    """One slot: one LoRA per request."""
    if count > 1:
        raise InvalidArgument(field, f"a compiled denoiser (--compile) applies one LoRA at a time, not {count}")


class HotswapActivator:
    """Same surface as `LoraActivator` (activate, deactivate, loaded, close, active)."""

    def __init__(self, model: Any, library: LoraLibrary, max_rank: int) -> None:
        self.model = model
        self.library = library
        self.max_rank = max_rank
        self._ops = _TransformerOps()
        self._in_slot: LoraWeights | None = None
        self._base_scalings: list[tuple[torch.Tensor, float]] = []  # (scaling tensor, alpha / rank)
        self.active: list[tuple[str, float]] = []
        with _adapter_mode():
            zeros = {}
            for name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear):
                    zeros[f"{name}.lora_A.weight"] = module.weight.new_zeros(max_rank, module.in_features)
                    zeros[f"{name}.lora_B.weight"] = module.weight.new_zeros(module.out_features, max_rank)
            model.enable_lora_hotswap(target_rank=max_rank)
            model.load_lora_adapter(zeros, prefix=None, adapter_name=SLOT)

    def activate(self, loras: Iterable[tuple[str, float]], *, field: str = "loras") -> list[tuple[str, float]]:
        requested = self.library.check(loras, field)
        check_stack(len(requested), field)
        with _adapter_mode():
            if not requested:
                self._empty()
                return []
            (name, weight), item = requested[0], f"{field}[0].name"
            lora = self.library.load(name, item)
            if lora is not self._in_slot:
                self._swap_in(lora, item)
            for scaling, base in self._base_scalings:
                scaling.fill_(base * weight)
        self.active = [(name, weight)]
        return self.active

    def deactivate(self) -> None:
        with _adapter_mode():
            self._empty()

    def loaded(self) -> list[str]:
        return [self._in_slot.name] if self._in_slot is not None else []

    def close(self) -> None:
        self._in_slot = None
        self.active = []

    def _empty(self, force: bool = False) -> None:
        if force or self._in_slot is not None:
            for name, parameter in self.model.named_parameters():
                if f"lora_B.{SLOT}." in name:
                    parameter.data.zero_()
        self._in_slot = None
        self.active = []

    def _swap_in(self, lora: LoraWeights, field: str) -> None:
        from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

        state_dict = lora.state_dict("transformer")
        rank = max((t.shape[0] for k, t in state_dict.items() if k.endswith("lora_A.weight")), default=0)
        if rank > self.max_rank:
            raise InvalidArgument(field, f"LoRA {lora.name!r} has rank {rank}, above --max-lora-rank {self.max_rank}")
        self._ops.check_fits(self.model, lora, field)
        self._in_slot = None  # until the copy is whole
        for scaling, _ in self._slot_scalings():
            scaling.fill_(1.0)  # layers this LoRA leaves out are zeroed; keep their scale finite
        try:
            FluxLoraLoaderMixin.load_lora_into_transformer(
                FluxLoraLoaderMixin._maybe_expand_lora_state_dict(self.model, dict(state_dict)),
                network_alphas=lora.network_alphas,
                transformer=self.model,
                adapter_name=SLOT,
                metadata=lora.metadata,
                hotswap=True,
            )
        except Exception as error:
            self._empty(force=True)
            raise InvalidArgument(
                field, f"LoRA {lora.name!r} does not hot-swap into the compiled denoiser: {error}"
            ) from error
        self._in_slot = lora
        self._base_scalings = self._slot_scalings()
        log.info("LoRA %s hot-swapped into the compiled transformer", lora.name)

    def _slot_scalings(self) -> list[tuple[torch.Tensor, float]]:
        """Each slot layer's scaling tensor and its value now (alpha / rank after a swap)."""
        return [
            (module.scaling[SLOT], float(module.scaling[SLOT]))
            for module in self.model.modules()
            if isinstance(getattr(module, "scaling", None), dict) and SLOT in module.scaling
        ]
