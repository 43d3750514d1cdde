"""Make a request's LoRA set active on one loaded model, without touching its base weights.

Each LoRA becomes one PEFT adapter in the model the first time a request names it (loaded the
way `FluxPipeline.load_lora_weights` loads it) and stays there while the library caches it.
Switching sets is then `set_adapters(names, weights)` — the same call `pipe.set_adapters` makes,
so a weight means what it means in diffusers (PEFT scaling = weight · alpha / rank) — and an
empty set is `disable_lora()`, under which every PEFT layer returns `base_layer(x)` untouched:
the base model's output, bit for bit. Nothing is fused, so a GGUF base stays quantized.

Not thread-safe by design: the adapters live in the model, so activation and the inference
that follows belong to one request at a time (the caller's model lock).

Every change to the adapters runs outside `torch.inference_mode`, whatever mode the caller is in:
the base weights are ordinary tensors (loaded that way), and PEFT's `set_adapter`/`delete_adapter`
set `requires_grad` on the adapter tensors, which torch refuses for an inference tensor outside
inference mode. Adapters created under the model thread's inference mode and deleted by a
release (outside it) broke every release of a request with two or more LoRAs.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fluxmesh.rpc.errors import InvalidArgument

from .library import COMPONENTS, LoraLibrary, LoraWeights

__all__ = ["LoraActivator"]

logger = logging.getLogger(__name__)

_ids = itertools.count()


@dataclass(frozen=True)
class _Adapter:
    adapter: str | None  # PEFT adapter name in the model; None: the file has nothing for it
    weights: LoraWeights  # identity tells a stale adapter (file re-read) from a current one


class LoraActivator:
    """Binds a `LoraLibrary` to one model: the FLUX transformer, or the CLIP text encoder.

    `component` is "transformer" or "text_encoder"; by default it is inferred (a diffusers
    `ModelMixin` is the transformer, a transformers `PreTrainedModel` the text encoder).
    """

    def __init__(self, model: Any, library: LoraLibrary, component: str | None = None) -> None:
        component = component or _infer_component(model)
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
        if component not in library.components:
            raise ValueError(f"the library drops {component!r} parts; build it with that component")
        self.model = model
        self.library = library
        self.component = component
        self._ops = _TransformerOps() if component == "transformer" else _TextEncoderOps()
        self._adapters: dict[str, _Adapter] = {}  # LoRA name -> its adapter in this model
        self.active: list[tuple[str, float]] = []  # what the last `activate` made active here
        library.add_eviction_listener(self._on_evict)

    def activate(self, loras: Iterable[tuple[str, float]], *, field: str = "loras") -> list[tuple[str, float]]:
        """Make exactly `loras` (`[(name, weight), ...]`, stacked in order) active on the model.

        Names, weights and files are checked before the model is touched (InvalidArgument /
        NotFound naming `field[i].name` or `.weight`). A LoRA that then does not fit the model is
        an InvalidArgument too, and leaves LoRAs disabled (base output) until the next call.
        Returns the (name, weight) pairs that touch this model (a LoRA may have no keys for it).
        """
        requested = self.library.check(loras, field)
        with _adapter_mode():
            return self._activate(requested, field)

    def _activate(self, requested: list[tuple[str, float]], field: str) -> list[tuple[str, float]]:
        files = [self.library.load(name, f"{field}[{i}].name") for i, (name, _) in enumerate(requested)]
        try:
            ids, weights, active = [], [], []
            for i, ((name, weight), lora) in enumerate(zip(requested, files)):
                adapter = self._ensure_loaded(lora, f"{field}[{i}].name")
                if adapter is not None:
                    ids.append(adapter)
                    weights.append(weight)
                    active.append((name, weight))
            if ids:
                # set_adapters does not undo an earlier disable_lora: enable first.
                self._ops.enable(self.model)
                self._ops.set(self.model, ids, weights)
            else:
                self._ops.disable(self.model)
        except BaseException:
            self._ops.disable(self.model)  # never leave a half-applied set behind
            self.active = []
            raise
        self.active = active
        return active

    def deactivate(self) -> None:
        """Base model output from now on; the adapters stay loaded for the next request."""
        with _adapter_mode():
            self._ops.disable(self.model)
        self.active = []

    def loaded(self) -> list[str]:
        """LoRA names that currently have an adapter in this model."""
        return [name for name, a in self._adapters.items() if a.adapter is not None]

    def close(self) -> None:
        """Delete every adapter from the model and stop listening (e.g. before releasing it)."""
        self.library.remove_eviction_listener(self._on_evict)
        with _adapter_mode():
            for name in list(self._adapters):
                self._forget(name)
        self.active = []

    # -- internals -------------------------------------------------------------------------

    def _ensure_loaded(self, lora: LoraWeights, field: str) -> str | None:
        known = self._adapters.get(lora.name)
        if known is not None and known.weights is lora:
            return known.adapter
        if known is not None:  # the file changed and was read again: replace the adapter
            self._forget(lora.name)
        adapter = None
        if lora.has(self.component):
            adapter = f"fluxmesh_lora_{next(_ids)}"  # PEFT names must not contain '.'
            self._ops.check_fits(self.model, lora, field)
            try:
                self._ops.load(self.model, lora, adapter)
            except Exception as e:
                self._ops.delete(self.model, adapter)  # drop whatever was injected
                raise InvalidArgument(field, f"LoRA {lora.name!r} does not load into the {self.component}: {e}") from e
            logger.info("LoRA %s loaded into the %s as adapter %s", lora.name, self.component, adapter)
        self._adapters[lora.name] = _Adapter(adapter, lora)
        return adapter

    def _forget(self, name: str) -> None:
        known = self._adapters.pop(name, None)
        if known is not None and known.adapter is not None:
            self._ops.delete(self.model, known.adapter)
            logger.info("LoRA %s removed from the %s", name, self.component)

    def _on_evict(self, name: str, weights: LoraWeights) -> None:
        known = self._adapters.get(name)
        if known is not None and known.weights is weights:
            with _adapter_mode():
                self._forget(name)


def _adapter_mode() -> torch.inference_mode:
    """The one autograd mode adapters are created, switched and deleted in (see the module doc)."""
    return torch.inference_mode(False)


def _infer_component(model: Any) -> str:
    from diffusers import ModelMixin

    return "transformer" if isinstance(model, ModelMixin) else "text_encoder"


class _TransformerOps:
    """The FLUX transformer side, as `FluxLoraLoaderMixin` and `pipe.set_adapters` do it."""

    def check_fits(self, model: Any, lora: LoraWeights, field: str) -> None:
        state_dict = {k.removeprefix("transformer."): v for k, v in lora.state_dict("transformer").items()}
        missing = _check_fits(model, state_dict, field, lora.name)
        if missing:
            logger.warning("LoRA %s: this model has no %s; those layers are skipped", lora.name, sorted(missing))

    def load(self, model: Any, lora: LoraWeights, adapter: str) -> None:
        from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, FluxLoraLoaderMixin

        # A copy: the expansion below may replace entries, and the cached dict must stay as read.
        state_dict = FluxLoraLoaderMixin._maybe_expand_lora_state_dict(model, dict(lora.state_dict("transformer")))
        FluxLoraLoaderMixin.load_lora_into_transformer(
            state_dict,
            network_alphas=lora.network_alphas,
            transformer=model,
            adapter_name=adapter,
            metadata=lora.metadata,
            low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA,
        )

    def set(self, model: Any, adapters: list[str], weights: list[float]) -> None:
        model.set_adapters(adapters, weights)

    def enable(self, model: Any) -> None:
        if getattr(model, "peft_config", None):
            model.enable_lora()

    def disable(self, model: Any) -> None:
        if getattr(model, "peft_config", None):
            model.disable_lora()

    def delete(self, model: Any, adapter: str) -> None:
        model.delete_adapters(adapter)


class _TextEncoderOps:
    """The CLIP text encoder side (kohya `lora_te1_…`, diffusers `text_encoder.…`)."""

    def check_fits(self, model: Any, lora: LoraWeights, field: str) -> None:
        from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

        # The key normalisation `_load_lora_into_text_encoder` applies before PEFT sees them
        # (kohya's `to_q_lora.down` etc. → `q_proj.lora_A`; no `text_model.` on transformers 5).
        state_dict = {k.removeprefix("text_encoder."): v for k, v in lora.state_dict("text_encoder").items()}
        state_dict = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state_dict))
        if not hasattr(model, "text_model"):
            state_dict = {k.removeprefix("text_model."): v for k, v in state_dict.items()}
        missing = _check_fits(model, state_dict, field, lora.name)
        if missing:
            raise InvalidArgument(field, f"LoRA {lora.name!r}: the text encoder has no {sorted(missing)[:3]}")

    def load(self, model: Any, lora: LoraWeights, adapter: str) -> None:
        from diffusers.loaders.lora_pipeline import _LOW_CPU_MEM_USAGE_DEFAULT_LORA, FluxLoraLoaderMixin

        FluxLoraLoaderMixin.load_lora_into_text_encoder(
            dict(lora.state_dict("text_encoder")),
            network_alphas=lora.network_alphas,
            text_encoder=model,
            prefix="text_encoder",
            lora_scale=1.0,
            adapter_name=adapter,
            metadata=lora.metadata,
            low_cpu_mem_usage=_LOW_CPU_MEM_USAGE_DEFAULT_LORA,
        )

    def set(self, model: Any, adapters: list[str], weights: list[float]) -> None:
        from diffusers.loaders.lora_base import set_adapters_for_text_encoder

        set_adapters_for_text_encoder(adapters, model, weights)

    def enable(self, model: Any) -> None:
        from diffusers.loaders.lora_base import enable_lora_for_text_encoder

        enable_lora_for_text_encoder(model)

    def disable(self, model: Any) -> None:
        from diffusers.loaders.lora_base import disable_lora_for_text_encoder

        disable_lora_for_text_encoder(model)

    def delete(self, model: Any, adapter: str) -> None:
        from diffusers.utils.peft_utils import delete_adapter_layers

        delete_adapter_layers(model, adapter)


def _check_fits(model: Any, state_dict: dict[str, Any], field: str, name: str) -> set[str]:
    """Check that the LoRA modules (keys without the component prefix) fit `model`'s linear layers.

    Checked before PEFT injects anything, so a LoRA made for another model (other widths, other
    architecture) is an INVALID_ARGUMENT that leaves the model untouched. An input wider in the
    model than in the LoRA is fine: diffusers zero-pads it (Flux Control transformers). Returns
    the modules the model lacks (e.g. `guidance_embedder` on schnell), which diffusers skips.
    """
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    modules = dict(model.named_modules())
    missing, present = set(), 0
    for key, tensor in state_dict.items():
        if not key.endswith((".lora_A.weight", ".lora_B.weight")):
            continue
        module_name, kind, _ = key.rsplit(".", 2)
        module = modules.get(module_name)
        base = getattr(module, "base_layer", module)
        if base is None or getattr(base, "weight", None) is None:
            missing.add(module_name)
            continue
        present += 1
        out_features, in_features = FluxLoraLoaderMixin._calculate_module_shape(model, base_module=base)
        fits = tensor.ndim == 2 and (
            tensor.shape[1] <= in_features if kind == "lora_A" else tensor.shape[0] == out_features
        )
        if not fits:
            raise InvalidArgument(
                field,
                f"LoRA {name!r} does not fit this model: {module_name} is {in_features}->{out_features}, "
                f"{kind} is {tuple(tensor.shape)}",
            )
    if not present:
        raise InvalidArgument(field, f"LoRA {name!r} targets no layer of this model (e.g. {sorted(missing)[:3]})")
    return missing
