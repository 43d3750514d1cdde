"""XLabs IP-Adapter image prompts, the denoiser's half: the adapter's projection and attention processors.

`--ip-adapter FILE` names XLabs' `ip_adapter.safetensors` (XLabs-AI/flux-ip-adapter's layout).
Each transformer the stage loads gets it through `FluxIPAdapterMixin.load_ip_adapter` itself, so
the key conversion and the modules (`MultiIPAdapterImageProjection`, `FluxIPAdapterAttnProcessor`
on every double block) are diffusers'. The image encoder is the encoder stage's (its
`--ip-adapter-image-encoder`); requests bring its embeds (FluxPipeline's `ip_adapter_image_embeds`).

Why the processors are installed per request and not kept in: diffusers' IP processor breaks a
forward that has no image embeds (it zips over `ip_hidden_states=None`), so a transformer that kept
them could no longer serve plain requests. They are held beside the transformer and put in around
one request's pipeline call (`applied`), on the model thread, then the previous processors come
back. LoRAs are untouched by this: PEFT wraps the attention's own projections (to_q, to_k, ...),
which both processors call. IP-Adapter requests run in their pipeline's own loop and never share
a forward with other requests (engine.batchable): the processors and their scale are set on the
shared transformer, for every row of a batch at once.

In sequential mode the adapter's modules are among the stage's weight modules: they are read with
the transformer, moved with it and dropped with it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import FluxPipeline
from diffusers.loaders import FluxIPAdapterMixin
from safetensors import safe_open

from fluxmesh import contract
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument, NotFound
from fluxmesh.services.runtime.tensors import from_pb
from fluxmesh.v1 import denoiser_pb2

__all__ = ["IpAdapterInput", "IpAdapterWeights", "check_ip_adapter_input", "ip_adapter_from_pb", "pipeline_inputs"]

_PROJECTION = "ip_adapter_proj_model.proj.weight"  # XLabs' name for the image projection


@dataclass(frozen=True)
class IpAdapterInput:
    image_embeds: torch.Tensor  # (1, D): the encoder's CLIP vision embeds of the image prompt
    negative_image_embeds: torch.Tensor | None  # (1, D): true CFG's negative pass
    scale: float


def ip_adapter_from_pb(request: denoiser_pb2.DenoiseRequest) -> IpAdapterInput | None:
    if not request.HasField("ip_adapter"):
        return None
    message = request.ip_adapter
    if not message.HasField("image_embeds"):
        raise InvalidArgument("ip_adapter.image_embeds", "is missing")
    negative = message.negative_image_embeds if message.HasField("negative_image_embeds") else None
    return IpAdapterInput(
        from_pb(message.image_embeds, "ip_adapter.image_embeds", ndim=2),
        from_pb(negative, "ip_adapter.negative_image_embeds", ndim=2) if negative is not None else None,
        message.scale,
    )


class IpAdapterWeights:
    """One XLabs IP-Adapter file, loaded into each transformer the stage reads."""

    def __init__(self, path: Path, *, joint_attention_dim: int, inner_dim: int, double_blocks: int):
        """Checks the file's shapes against the transformer's config (no weights read yet)."""
        if not path.is_file():
            raise NotFound(f"--ip-adapter {path}: no such file (XLabs' ip_adapter.safetensors)")
        if path.suffix != ".safetensors":
            raise FailedPrecondition(f"--ip-adapter {path}: safetensors only (nothing is unpickled)")
        self.path = path
        with safe_open(path, framework="pt") as f:
            keys = set(f.keys())
            if _PROJECTION not in keys:
                raise FailedPrecondition(f"--ip-adapter {path}: no {_PROJECTION}; not an XLabs FLUX IP-Adapter")
            rows, self.embed_dim = f.get_slice(_PROJECTION).get_shape()
            blocks = {k.split(".")[1] for k in keys if k.startswith("double_blocks.")}
            k_shape = (
                f.get_slice("double_blocks.0.processor.ip_adapter_double_stream_k_proj.weight").get_shape()
                if blocks
                else None
            )
        tokens = 16 if rows == 65536 else 4  # as diffusers infers it
        if (
            rows != tokens * joint_attention_dim
            or len(blocks) != double_blocks
            or k_shape != [inner_dim, joint_attention_dim]
        ):
            raise FailedPrecondition(
                f"--ip-adapter {path}: made for another FLUX model (projection {rows} rows, {len(blocks)} double "
                f"blocks, k projection {k_shape}; this transformer: {tokens} x {joint_attention_dim} rows, "
                f"{double_blocks} double blocks, [{inner_dim}, {joint_attention_dim}])"
            )
        self._processors: dict[str, Any] | None = None
        self._projection: torch.nn.Module | None = None
        self._modules: torch.nn.ModuleList | None = None

    def load(self, pipe: FluxPipeline) -> None:
        """Read the adapter into `pipe.transformer` with diffusers' loader, then take its modules out."""
        transformer = pipe.transformer
        plain = dict(transformer.attn_processors)
        # The image encoder is the encoder stage's: none here (diffusers' warning about that, at
        # every load, would only mislead whoever reads the stage's log).
        quiet = logging.getLogger("diffusers.loaders.ip_adapter")
        level = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            pipe.load_ip_adapter(
                str(self.path.parent),
                weight_name=self.path.name,
                image_encoder_pretrained_model_name_or_path=None,
                local_files_only=True,
            )
        finally:
            quiet.setLevel(level)
        self._processors = dict(transformer.attn_processors)
        self._projection = transformer.encoder_hid_proj
        self._modules = torch.nn.ModuleList(
            [self._projection, *(p for p in self._processors.values() if isinstance(p, torch.nn.Module))]
        )
        _install(transformer, plain, None)

    def drop(self) -> None:
        self._processors = self._projection = self._modules = None

    def modules(self) -> list[torch.nn.Module]:
        return [self._modules] if self._modules is not None else []

    @contextmanager
    def applied(self, pipe: FluxPipeline, scale: float) -> Iterator[None]:
        """The adapter in `pipe.transformer` at `scale` (set_ip_adapter_scale) for the block's span."""
        transformer = pipe.transformer
        before = dict(transformer.attn_processors)
        _install(transformer, self._processors, self._projection)
        try:
            pipe.set_ip_adapter_scale(scale)
            yield
        finally:
            _install(transformer, before, None)


def _install(transformer, processors: dict[str, Any], projection: torch.nn.Module | None) -> None:
    transformer.set_attn_processor(dict(processors))  # it pops from the dict it is given
    transformer.encoder_hid_proj = projection
    transformer.config.encoder_hid_dim_type = "ip_image_proj" if projection is not None else None


def check_ip_adapter_input(
    ip_adapter: IpAdapterInput | None,
    weights: IpAdapterWeights | None,
    *,
    pipeline_class: type,
    true_cfg: bool,
) -> None:
    """The adapter is loaded, the embeds fit it, the scale is in range, the pipeline takes one."""
    if ip_adapter is None:
        return
    if weights is None:
        raise FailedPrecondition("ip_adapter: this denoiser has no IP-Adapter (start it with --ip-adapter FILE)")
    contract.check_ip_adapter_scale("ip_adapter.scale", ip_adapter.scale)
    if not issubclass(pipeline_class, FluxIPAdapterMixin):
        raise InvalidArgument("ip_adapter", f"{pipeline_class.__name__} takes no IP-Adapter image prompt")
    if true_cfg and ip_adapter.negative_image_embeds is None:
        raise InvalidArgument("ip_adapter.negative_image_embeds", "true CFG's negative pass needs them")
    if not true_cfg and ip_adapter.negative_image_embeds is not None:
        raise InvalidArgument("ip_adapter.negative_image_embeds", "apply only with true CFG")
    for field, tensor in (
        ("image_embeds", ip_adapter.image_embeds),
        ("negative_image_embeds", ip_adapter.negative_image_embeds),
    ):
        if tensor is None:
            continue
        contract.check_float_dtype(f"ip_adapter.{field}.dtype", str(tensor.dtype))
        if tuple(tensor.shape) != (1, weights.embed_dim):
            raise InvalidArgument(
                f"ip_adapter.{field}.shape",
                f"{list(tensor.shape)}: expected [1, {weights.embed_dim}] (this adapter's CLIP embed width)",
            )


def pipeline_inputs(ip_adapter: IpAdapterInput, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The pipeline's arguments, shaped as prepare_ip_adapter_image_embeds makes them from images
    (one adapter: a list of one (1, 1, D))."""
    positive = ip_adapter.image_embeds.to(device, dtype)[None]
    # Without true CFG the negative embeds are never used, but the pipeline would encode a black
    # image for them with an image encoder this stage does not have: hand it the positive's.
    negative = ip_adapter.negative_image_embeds
    negative = negative.to(device, dtype)[None] if negative is not None else positive
    return {"ip_adapter_image_embeds": [positive], "negative_ip_adapter_image_embeds": [negative]}
