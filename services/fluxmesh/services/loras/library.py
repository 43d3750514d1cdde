"""A directory of LoRA files: name resolution, validation, one read per file, an LRU cache.

Names are paths relative to the directory without `.safetensors` (`style/ink` for
`<dir>/style/ink.safetensors`). Files are read with safetensors only (never pickle) and converted
to diffusers' key layout by diffusers' own `FluxLoraLoaderMixin.lora_state_dict`, so kohya,
XLabs, PEFT and ComfyUI naming behave exactly as in `FluxPipeline.load_lora_weights`.

Models hold one PEFT adapter per cached LoRA (see `activation.py`); when the cache drops a LoRA
it tells its listeners, which delete that adapter, so model memory stays bounded by `max_cached`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from fluxmesh import contract
from fluxmesh.rpc.errors import InvalidArgument, NotFound

__all__ = ["COMPONENTS", "LoraLibrary", "LoraWeights"]

logger = logging.getLogger(__name__)

SUFFIX = ".safetensors"
# Which model a part of a LoRA goes to, named as diffusers prefixes the keys.
COMPONENTS = ("transformer", "text_encoder")
# Flux Control LoRAs carry norm weights that diffusers writes into the base model for good;
# that cannot be switched off per request, so such files are refused.
_CONTROL_NORM_KEYS = ("norm_q", "norm_k", "norm_added_q", "norm_added_k")

EvictionListener = Callable[[str, "LoraWeights"], None]


@dataclass(frozen=True, eq=False)
class LoraWeights:
    """One LoRA file converted to diffusers keys (`transformer.…lora_A.weight`, `text_encoder.…`).

    Identity matters: a new object means a new read (the file changed), so adapters built from
    an older object are stale.
    """

    name: str
    path: Path
    parts: dict[str, dict[str, Any]]  # component -> state dict, keys keep the component prefix
    network_alphas: dict[str, Any] | None  # diffusers' `network_alphas` (PEFT files with `.alpha`)
    metadata: dict[str, Any] | None  # diffusers' `lora_adapter_metadata` from the file header
    components_in_file: frozenset[str] = frozenset()  # parts the file had, kept or not

    def state_dict(self, component: str) -> dict[str, Any]:
        return self.parts.get(component, {})

    def has(self, component: str) -> bool:
        return bool(self.parts.get(component))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for sd in self.parts.values() for t in sd.values())


class LoraLibrary:
    """The LoRA files under `directory`, read on first use and kept (at most `max_cached`, LRU).

    `components` says which parts of a file this process needs ("transformer" on the denoiser,
    "text_encoder" on the encoder); the other parts are dropped after the read.

    Not a request-level lock: the model that adapters live in must be used by one request at a
    time anyway, so callers serialise `activate` + inference; the internal lock only keeps the
    cache consistent.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        max_cached: int = 8,
        *,
        components: Collection[str] = COMPONENTS,
    ) -> None:
        if max_cached < 1:
            raise ValueError("max_cached must be at least 1")
        unknown = set(components) - set(COMPONENTS)
        if unknown:
            raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
        self.directory = Path(directory).resolve()
        if not self.directory.is_dir():
            raise NotFound(f"LoRA directory {self.directory} does not exist")
        self.max_cached = max_cached
        self.components = tuple(components)
        self.reads = 0  # files read from disk: a metric, and how tests prove "read once"
        self._cache: OrderedDict[str, tuple[tuple[int, int], LoraWeights]] = OrderedDict()
        self._listeners: list[weakref.ReferenceType] = []
        self._lock = threading.RLock()
        self._skipped: set[str] = set()  # odd directory entries already logged

    # -- names -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Every `*.safetensors` under the directory (subfolders too) that a request could name.

        An entry no request could use — a dangling symlink, a symlink loop, one pointing out of
        the directory, a name `resolve` refuses (a backslash, not UTF-8), something that is not
        a regular file — is skipped and logged once: one odd file must not break the listing
        for everyone, nor show the server's paths to a client.
        """
        found = []
        for root, dirs, files in os.walk(self.directory):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for file in files:
                if not file.endswith(SUFFIX) or file.startswith("."):
                    continue
                name = Path(root, file).relative_to(self.directory).as_posix()[: -len(SUFFIX)]
                try:
                    name.encode("utf-8")  # a file name that is not UTF-8 cannot travel in a proto string
                    self.resolve(name)
                except (InvalidArgument, NotFound, UnicodeEncodeError) as e:
                    self._skip(name, str(e))
                    continue
                found.append(name)
        return sorted(found)

    def _skip(self, name: str, reason: str) -> None:
        with self._lock:
            if name in self._skipped:
                return
            self._skipped.add(name)
        logger.warning("LoRA directory %s: skipping %r: %s", self.directory, name, reason)

    def resolve(self, name: Any, field: str = "lora.name") -> Path:
        """The file for `name`; InvalidArgument if the name leaves the directory, NotFound if absent."""
        if not isinstance(name, str) or not name:
            raise InvalidArgument(field, f"must be a non-empty LoRA name, got {name!r}")
        if "\\" in name or "\x00" in name or len(name) > 512:
            raise InvalidArgument(field, f"{name!r} is not a valid LoRA name")
        pure = PurePosixPath(name)
        if pure.is_absolute() or any(part in ("", ".", "..") for part in name.split("/")):
            raise InvalidArgument(field, f"{name!r} must be a path relative to the LoRA directory, without '..'")
        path = self.directory.joinpath(*pure.parts[:-1], pure.name + SUFFIX)
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a symlink loop (RuntimeError before Python 3.13)
            raise InvalidArgument(field, f"{name!r} is a symlink loop") from None
        if not _inside(target, self.directory):
            raise InvalidArgument(field, f"{name!r} points outside the LoRA directory")
        if not path.is_file():
            raise NotFound(f"{field}: no LoRA named {name!r} in the LoRA directory")
        return path

    def check(self, loras: Iterable[tuple[Any, Any]], field: str = "loras") -> list[tuple[str, float]]:
        """Validate a request's `[(name, weight), ...]` up front: the contract's rules (weights in
        range, no name twice), then every name resolves to a file inside the directory."""
        checked = list(contract.check_loras(loras, field))  # counted (the contract's ceiling) before walked
        if len(checked) > self.max_cached:
            # More than the cache holds would evict an adapter of this very request mid-way.
            raise InvalidArgument(field, f"at most {self.max_cached} LoRAs per request, got {len(checked)}")
        for i, (name, _) in enumerate(checked):
            self.resolve(name, f"{field}[{i}].name")
        return checked

    # -- cache -----------------------------------------------------------------------------

    def load(self, name: str, field: str = "lora.name") -> LoraWeights:
        """The converted LoRA `name`: read from disk once, then from the cache (LRU order updated).

        A file changed on disk (size or mtime) is read again and its old entry evicted.
        """
        path = self.resolve(name, field)
        try:
            stat = path.stat()
        except OSError:  # removed since resolve: as if it had never been there
            raise NotFound(f"{field}: no LoRA named {name!r} in the LoRA directory") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            entry = self._cache.get(name)
            if entry is not None and entry[0] == stamp:
                self._cache.move_to_end(name)
                return entry[1]
            weights = self._read(name, path, field)
            self.reads += 1
            if entry is not None:
                del self._cache[name]
                self._notify(name, entry[1])
            self._cache[name] = (stamp, weights)
            while len(self._cache) > self.max_cached:
                old_name, (_, old) = self._cache.popitem(last=False)
                logger.info("LoRA cache full: evicting %s", old_name)
                self._notify(old_name, old)
            return weights

    def cached(self) -> list[str]:
        """Cached names, least recently used first."""
        with self._lock:
            return list(self._cache)

    def clear(self) -> None:
        with self._lock:
            while self._cache:
                name, (_, weights) = self._cache.popitem(last=False)
                self._notify(name, weights)

    def add_eviction_listener(self, listener: EvictionListener) -> None:
        """Call `listener(name, weights)` when a LoRA leaves the cache. Held weakly, so a model's
        activation that is dropped stops listening by itself."""
        ref = weakref.WeakMethod(listener) if hasattr(listener, "__self__") else weakref.ref(listener)
        with self._lock:
            self._listeners.append(ref)

    def remove_eviction_listener(self, listener: EvictionListener) -> None:
        with self._lock:
            self._listeners = [r for r in self._listeners if r() is not None and r() != listener]

    def _notify(self, name: str, weights: LoraWeights) -> None:
        alive = []
        for ref in self._listeners:
            listener = ref()
            if listener is None:
                continue
            alive.append(ref)
            try:
                listener(name, weights)
            except Exception:  # one broken model must not break the cache for the others
                logger.exception("LoRA eviction listener failed for %s", name)
        self._listeners = alive

    # -- reading ---------------------------------------------------------------------------

    def _read(self, name: str, path: Path, field: str) -> LoraWeights:
        tensors, header = _read_safetensors(name, path, field)
        return _convert(name, path, tensors, header, self.components, field)


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _lora_dtypes() -> tuple[Any, ...]:
    import torch

    return (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _read_safetensors(name: str, path: Path, field: str) -> tuple[dict[str, Any], dict[str, str]]:
    import torch
    from safetensors import SafetensorError, safe_open

    try:
        # Ordinary tensors, not inference tensors, even on the model thread: PEFT may adopt them
        # as adapter weights (see activation.py).
        with torch.inference_mode(False), safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidArgument(field, f"LoRA {name!r}: not a readable safetensors file ({e})") from None
    if not tensors:
        raise InvalidArgument(field, f"LoRA {name!r}: the file holds no tensors")
    for key, tensor in tensors.items():
        # Checked before any math on them: torch has no kernels for float8 and friends. An
        # integer scalar is an alpha some trainers write.
        integer_scalar = tensor.ndim == 0 and not (tensor.is_floating_point() or tensor.is_complex())
        if tensor.dtype not in _lora_dtypes() and not integer_scalar:
            raise InvalidArgument(
                field,
                f"LoRA {name!r} ({path.name}): tensor {key!r} is {str(tensor.dtype).removeprefix('torch.')}; "
                f"LoRA weights must be {', '.join(str(d).removeprefix('torch.') for d in _lora_dtypes())}",
            )
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidArgument(field, f"LoRA {name!r}: tensor {key!r} holds NaN or infinity")
    return tensors, header


_BFL_ROOTS = ("diffusion_model.double_blocks.", "diffusion_model.single_blocks.", "double_blocks.", "single_blocks.")


def _is_bfl_lora_a(tensors: dict[str, Any]) -> bool:
    """BFL module names with PEFT suffixes; not XLabs (`.processor.`) and not Control (norms)."""
    return any(k.startswith(_BFL_ROOTS) and (".lora_A." in k or ".lora_B." in k) for k in tensors) and not any(
        "query_norm.scale" in k or ".processor." in k for k in tensors
    )


def _bfl_lora_a_to_comfy(tensors: dict[str, Any]) -> dict[str, Any]:
    """BFL-named `diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight` → `….lora_down.weight`.

    diffusers 0.42's `FluxLoraLoaderMixin` does not recognise BFL module names with PEFT's
    `lora_A`/`lora_B` suffixes (it silently loads nothing); the same file with kohya's
    `lora_down`/`lora_up` suffixes is ComfyUI's format, which diffusers' kohya converter maps
    (`diffusion_model.` → `lora_unet_`). Renaming the suffixes is the whole fix; the module
    mapping, the qkv split and alpha handling stay diffusers'.
    """
    renamed = {}
    for key, value in tensors.items():
        if key.startswith(("double_blocks.", "single_blocks.")):
            key = "diffusion_model." + key
        renamed[key.replace(".lora_A.weight", ".lora_down.weight").replace(".lora_B.weight", ".lora_up.weight")] = value
    return renamed


def _convert(
    name: str,
    path: Path,
    tensors: dict[str, Any],
    header: dict[str, str],
    components: tuple[str, ...],
    field: str,
) -> LoraWeights:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    if any("query_norm.scale" in k for k in tensors):
        raise InvalidArgument(field, f"LoRA {name!r}: Flux Control LoRAs (with norm layers) are not supported")
    metadata = None
    if header.get(LORA_ADAPTER_METADATA_KEY):
        try:
            metadata = json.loads(header[LORA_ADAPTER_METADATA_KEY])
        except json.JSONDecodeError as e:
            raise InvalidArgument(field, f"LoRA {name!r}: malformed {LORA_ADAPTER_METADATA_KEY} header ({e})") from None
    if _is_bfl_lora_a(tensors):
        tensors = _bfl_lora_a_to_comfy(tensors)
    try:
        # diffusers' detection + converters (kohya/sd-scripts, ComfyUI, XLabs, mixtures, PEFT).
        state_dict, network_alphas, _ = FluxLoraLoaderMixin.lora_state_dict(
            dict(tensors), return_alphas=True, return_lora_metadata=True
        )
    except Exception as e:  # the converters raise ValueError, KeyError, AssertionError, ...
        raise InvalidArgument(
            field, f"LoRA {name!r}: not a FLUX LoRA that diffusers can convert ({type(e).__name__}: {_short(e)})"
        ) from None
    if any(k.startswith("transformer.") and any(n in k for n in _CONTROL_NORM_KEYS) for k in state_dict):
        raise InvalidArgument(field, f"LoRA {name!r}: Flux Control LoRAs (with norm layers) are not supported")

    # The same split FluxLoraLoaderMixin.load_lora_weights makes before loading each model.
    split = {
        "transformer": {k: v for k, v in state_dict.items() if k.startswith("transformer.") and "lora" in k},
        "text_encoder": {k: v for k, v in state_dict.items() if k.startswith("text_encoder.")},
    }
    in_file = frozenset(c for c, sd in split.items() if sd)
    if not in_file:
        sample = ", ".join(sorted(tensors)[:3])
        raise InvalidArgument(field, f"LoRA {name!r}: no recognisable FLUX LoRA keys (found e.g. {sample})")
    ignored = sorted(set(state_dict) - set(split["transformer"]) - set(split["text_encoder"]))
    if ignored:
        # e.g. kohya `lora_unet_img_in`/`txt_in`/`time_in`/`final_layer`: diffusers 0.42 converts
        # them to keys without the `transformer.` prefix, and load_lora_weights then skips them.
        logger.warning("LoRA %s: %d keys are ignored, as diffusers ignores them: %s", name, len(ignored), ignored[:4])
    return LoraWeights(
        name=name,
        path=path,
        parts={c: split[c] for c in components},
        network_alphas=network_alphas,
        metadata=metadata,
        components_in_file=in_file,
    )


def _short(e: Exception, limit: int = 300) -> str:
    text = str(e).replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"
