"""FLUX transformer tensor names: diffusers <-> BFL (the original Black Forest Labs checkpoint).

Community GGUF files (city96/FLUX.1-dev-gguf and the like) use BFL names, where q/k/v are fused
(`img_attn.qkv`, `txt_attn.qkv`) and a single block's q, k, v and MLP input are one `linear1`.
diffusers ships BFL->diffusers (`convert_flux_transformer_checkpoint_to_diffusers`) but with the
width of FLUX.1 hard-coded (inner_dim=3072), so it cannot convert a smaller model; and nothing for
diffusers->BFL. Both directions here come from one table (`bfl_recipes`), so they cannot drift
apart; the tests check the table against diffusers' converter.

Every BFL tensor is built from diffusers tensors by a `Recipe`: a plain rename, a row-wise
concatenation, or (for the final AdaLN) a concatenation with the two halves swapped. All joins
and splits are along dim 0 (output rows), which also holds for GGUF-quantized tensors whose
blocks run along the last dim, so the reverse direction works on quantized weights unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TypeVar

__all__ = [
    "BFL_PREFIX",
    "Recipe",
    "bfl_recipes",
    "bfl_to_diffusers",
    "check_names",
    "diffusers_names",
    "diffusers_to_bfl",
    "is_bfl_naming",
    "recipes_for_bfl_keys",
    "recipes_for_diffusers_keys",
    "strip_bfl_prefix",
]

T = TypeVar("T")

# Single-file checkpoints from ComfyUI / original repos often carry this prefix.
BFL_PREFIX = "model.diffusion_model."


@dataclass(frozen=True)
class Recipe:
    """One BFL tensor = the diffusers `sources` stacked along dim 0 (halves swapped if `swap`)."""

    sources: tuple[str, ...]
    swap: bool = False  # BFL's final AdaLN emits (shift, scale); diffusers' emits (scale, shift)

    def build(self, get: Callable[[str], T]) -> T:
        import torch

        parts = [get(name) for name in self.sources]
        if self.swap:
            scale, shift = parts[0].chunk(2, dim=0)
            return torch.cat([shift, scale], dim=0)
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def rows(self, total_rows: int, inner_dim: int) -> list[int]:
        """How the BFL tensor's `total_rows` split back into the sources' rows."""
        n = len(self.sources)
        if n == 1:
            return [total_rows]
        if n == 3:  # q, k, v: equal thirds
            return [total_rows // 3] * 3
        return [inner_dim] * 3 + [total_rows - 3 * inner_dim]  # q, k, v, proj_mlp

    def split(self, tensor: T, inner_dim: int) -> dict[str, T]:
        import torch

        if self.swap:
            shift, scale = tensor.chunk(2, dim=0)
            return {self.sources[0]: torch.cat([scale, shift], dim=0)}
        if len(self.sources) == 1:
            return {self.sources[0]: tensor}
        pieces = torch.split(tensor, self.rows(tensor.shape[0], inner_dim), dim=0)
        return dict(zip(self.sources, pieces))


def _linear(bfl: str, diffusers: str) -> dict[str, Recipe]:
    return {f"{bfl}.{p}": Recipe((f"{diffusers}.{p}",)) for p in ("weight", "bias")}


def _fused(bfl: str, diffusers: Iterable[str]) -> dict[str, Recipe]:
    return {f"{bfl}.{p}": Recipe(tuple(f"{d}.{p}" for d in diffusers)) for p in ("weight", "bias")}


def _double_block(i: int) -> dict[str, Recipe]:
    b, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
    out: dict[str, Recipe] = {}
    out |= _linear(f"{b}.img_mod.lin", f"{d}.norm1.linear")
    out |= _linear(f"{b}.txt_mod.lin", f"{d}.norm1_context.linear")
    out |= _fused(f"{b}.img_attn.qkv", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v"))
    out |= _fused(f"{b}.txt_attn.qkv", (f"{d}.attn.add_q_proj", f"{d}.attn.add_k_proj", f"{d}.attn.add_v_proj"))
    out |= _linear(f"{b}.img_attn.proj", f"{d}.attn.to_out.0")
    out |= _linear(f"{b}.txt_attn.proj", f"{d}.attn.to_add_out")
    out |= _linear(f"{b}.img_mlp.0", f"{d}.ff.net.0.proj")
    out |= _linear(f"{b}.img_mlp.2", f"{d}.ff.net.2")
    out |= _linear(f"{b}.txt_mlp.0", f"{d}.ff_context.net.0.proj")
    out |= _linear(f"{b}.txt_mlp.2", f"{d}.ff_context.net.2")
    for stream, q, k in (("img", "norm_q", "norm_k"), ("txt", "norm_added_q", "norm_added_k")):
        out[f"{b}.{stream}_attn.norm.query_norm.scale"] = Recipe((f"{d}.attn.{q}.weight",))
        out[f"{b}.{stream}_attn.norm.key_norm.scale"] = Recipe((f"{d}.attn.{k}.weight",))
    return out


def _single_block(i: int) -> dict[str, Recipe]:
    b, d = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
    out: dict[str, Recipe] = {}
    out |= _linear(f"{b}.modulation.lin", f"{d}.norm.linear")
    out |= _fused(f"{b}.linear1", (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp"))
    out |= _linear(f"{b}.linear2", f"{d}.proj_out")
    out[f"{b}.norm.query_norm.scale"] = Recipe((f"{d}.attn.norm_q.weight",))
    out[f"{b}.norm.key_norm.scale"] = Recipe((f"{d}.attn.norm_k.weight",))
    return out


def _count(keys: Iterable[str], pattern: str) -> int:
    indices = {int(m.group(1)) for k in keys if (m := re.match(pattern, k))}
    return max(indices) + 1 if indices else 0


def bfl_recipes(num_layers: int, num_single_layers: int, guidance: bool) -> dict[str, Recipe]:
    """Every BFL tensor name of a FLUX transformer of this shape, with how to build it."""
    out: dict[str, Recipe] = {}
    out |= _linear("time_in.in_layer", "time_text_embed.timestep_embedder.linear_1")
    out |= _linear("time_in.out_layer", "time_text_embed.timestep_embedder.linear_2")
    out |= _linear("vector_in.in_layer", "time_text_embed.text_embedder.linear_1")
    out |= _linear("vector_in.out_layer", "time_text_embed.text_embedder.linear_2")
    if guidance:  # FLUX.1-dev only; schnell has no guidance embedding
        out |= _linear("guidance_in.in_layer", "time_text_embed.guidance_embedder.linear_1")
        out |= _linear("guidance_in.out_layer", "time_text_embed.guidance_embedder.linear_2")
    out |= _linear("txt_in", "context_embedder")
    out |= _linear("img_in", "x_embedder")
    for i in range(num_layers):
        out |= _double_block(i)
    for i in range(num_single_layers):
        out |= _single_block(i)
    out |= _linear("final_layer.linear", "proj_out")
    for p in ("weight", "bias"):
        out[f"final_layer.adaLN_modulation.1.{p}"] = Recipe((f"norm_out.linear.{p}",), swap=True)
    return out


def recipes_for_diffusers_keys(keys: Iterable[str]) -> dict[str, Recipe]:
    keys = list(keys)
    return bfl_recipes(
        _count(keys, r"transformer_blocks\.(\d+)\."),
        _count(keys, r"single_transformer_blocks\.(\d+)\."),
        any(k.startswith("time_text_embed.guidance_embedder.") for k in keys),
    )


def recipes_for_bfl_keys(keys: Iterable[str]) -> dict[str, Recipe]:
    keys = list(keys)
    return bfl_recipes(
        _count(keys, r"double_blocks\.(\d+)\."),
        _count(keys, r"single_blocks\.(\d+)\."),
        any(k.startswith("guidance_in.") for k in keys),
    )


def is_bfl_naming(keys: Iterable[str]) -> bool:
    """True for BFL names (`double_blocks.0.img_attn.qkv.weight`), False for diffusers names."""
    return any(strip_bfl_prefix(k).startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in keys)


def strip_bfl_prefix(key: str) -> str:
    return key[len(BFL_PREFIX) :] if key.startswith(BFL_PREFIX) else key


def diffusers_names(recipes: Mapping[str, Recipe]) -> list[str]:
    return [s for r in recipes.values() for s in r.sources]


def check_names(given: Iterable[str], expected: Iterable[str], what: str) -> None:
    """KeyError naming the first missing and unexpected tensors unless the name sets match."""
    given, expected = set(given), set(expected)
    if given != expected:
        missing, extra = sorted(expected - given), sorted(given - expected)
        raise KeyError(f"not a FLUX transformer in {what} naming: missing {missing[:5]}, unexpected {extra[:5]}")


def diffusers_to_bfl(state_dict: Mapping[str, T]) -> dict[str, T]:
    """diffusers FLUX transformer state dict -> BFL names (fused qkv, linear1, swapped final AdaLN)."""
    recipes = recipes_for_diffusers_keys(state_dict)
    check_names(state_dict, diffusers_names(recipes), "diffusers")
    return {name: recipe.build(state_dict.__getitem__) for name, recipe in recipes.items()}


def bfl_to_diffusers(state_dict: Mapping[str, T], inner_dim: int | None = None) -> dict[str, T]:
    """BFL FLUX transformer state dict -> diffusers names, for any width (unlike diffusers' converter).

    `inner_dim` (heads x head_dim) defaults to `img_in`'s output rows.
    """
    sd = {strip_bfl_prefix(k): v for k, v in state_dict.items()}
    recipes = recipes_for_bfl_keys(sd)
    check_names(sd, recipes, "BFL")
    inner_dim = inner_dim or sd["img_in.weight"].shape[0]
    out: dict[str, T] = {}
    for name, recipe in recipes.items():
        out |= recipe.split(sd[name], inner_dim)
    return out
