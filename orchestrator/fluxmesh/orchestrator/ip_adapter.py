"""IP_ADAPTER references: an XLabs IP-Adapter image prompt, checked up front and routed to the stages.

The encoder (--ip-adapter-image-encoder) turns each image into CLIP vision embeds beside the
prompt's text embeddings, and the denoiser (--ip-adapter) feeds them to the adapter's attention
processors at the request's scale, as `FluxPipeline(ip_adapter_image=..., negative_ip_adapter_image=...)`
after `set_ip_adapter_scale(scale)`. With true CFG the negative prompt's encode call carries the
negative image prompt — the request's, else FluxPipeline's default, a black image at the output
size; without a positive one the positive is that black image too, as the pipeline does.
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.v1 import denoiser_pb2, encoder_pb2, generator_pb2

__all__ = ["IpAdapterReference", "check_ip_adapter", "denoiser_ip_adapter", "encoder_ip_adapter_image"]

DEFAULT_SCALE = 1.0  # FluxIPAdapterMixin loads the adapter at scale 1
_NAME = "REFERENCE_ROLE_IP_ADAPTER"


@dataclass(frozen=True)
class IpAdapterReference:
    image: bytes  # PNG/JPEG; empty: the black default (only a negative-only request has that)
    negative: bytes | None  # the negative image prompt; None: black with true CFG
    scale: float


def check_ip_adapter(
    references: list[tuple[str, generator_pb2.Reference]],
    *,
    encoder_dim: int,
    denoiser_dim: int,
    has_negative_prompt: bool,
    limits: Limits = LIMITS,
) -> IpAdapterReference | None:
    """`references`: (field name, reference) of every IP_ADAPTER one; `*_dim`: the stages'
    StageInfo.ip_adapter_embed_dim (0: the stage has no IP-Adapter part)."""
    if not references:
        return None
    field = references[0][0]
    if not denoiser_dim:
        raise FailedPrecondition(f"{field}.role: {_NAME} needs the denoiser started with --ip-adapter FILE; it was not")
    if not encoder_dim:
        raise FailedPrecondition(
            f"{field}.role: {_NAME} needs the encoder started with --ip-adapter-image-encoder FOLDER; it was not"
        )
    if encoder_dim != denoiser_dim:
        raise FailedPrecondition(
            f"{field}.role: the encoder's CLIP vision model makes {encoder_dim}-wide image embeds, "
            f"the denoiser's IP-Adapter takes {denoiser_dim}: they do not belong together"
        )
    positive: bytes | None = None
    negative: bytes | None = None
    scales: list[tuple[str, float]] = []
    for field, reference in references:
        if reference.negative:
            if negative is not None:
                raise InvalidArgument(f"{field}.negative", f"one negative {_NAME} reference per request")
            if not has_negative_prompt:
                raise InvalidArgument(
                    f"{field}.negative", "a negative image prompt applies only with true CFG (a negative_prompt)"
                )
            negative = reference.image
        else:
            if positive is not None:
                raise InvalidArgument(f"{field}.role", f"one {_NAME} reference per request (one adapter is loaded)")
            positive = reference.image
        if reference.HasField("scale"):
            contract.check_ip_adapter_scale(f"{field}.scale", reference.scale, limits)
            scales.append((f"{field}.scale", reference.scale))
    if len(scales) == 2 and scales[0][1] != scales[1][1]:
        raise InvalidArgument(scales[1][0], f"{scales[1][1]:g} != {scales[0][1]:g}: the adapter has one scale")
    scale = scales[0][1] if scales else DEFAULT_SCALE
    return IpAdapterReference(positive or b"", negative, scale)


def encoder_ip_adapter_image(
    reference: IpAdapterReference, *, negative: bool, width: int, height: int
) -> encoder_pb2.IpAdapterImage:
    """What the prompt's (or with `negative` the negative prompt's) encode call carries."""
    image = reference.negative if negative else reference.image
    if image:
        return encoder_pb2.IpAdapterImage(image=image)
    return encoder_pb2.IpAdapterImage(width=width, height=height)  # FluxPipeline's black default


def denoiser_ip_adapter(
    reference: IpAdapterReference,
    embeddings: encoder_pb2.EncodeResponse,
    negative: encoder_pb2.EncodeResponse | None,
) -> denoiser_pb2.IpAdapter:
    message = denoiser_pb2.IpAdapter(image_embeds=embeddings.ip_adapter_image_embeds, scale=reference.scale)
    if negative is not None:
        message.negative_image_embeds.CopyFrom(negative.ip_adapter_image_embeds)
    return message
