"""A GenerateRequest's `references`: the rest of the FLUX.1 family, validated up front.

Each reference is an image with a role: KONTEXT (the image FluxKontextPipeline edits), CONTROL
(FluxControlPipeline's control image), REDUX (FluxPriorReduxPipeline's image prompts), IP_ADAPTER
(an XLabs IP-Adapter image prompt: ip_adapter.py). With an init image and mask a KONTEXT
reference is FluxKontextInpaintPipeline; a CONTROL one with an init image (and mask)
FluxControlImg2ImgPipeline (FluxControlInpaintPipeline); CONTROLNET references (controlnets.py)
are a ControlNet's control images. Every combination is checked here,
before any stage works: fields that do not belong to a role, counts, scales, combinations with
the other inputs, and whether the loaded models have the capability at all (FAILED_PRECONDITION
naming the reference when they do not; the capabilities come from the stages' Info).

The vae stage encodes KONTEXT, CONTROL and CONTROLNET images in the same turn as an init image; REDUX images
go to the encoder with the prompt (see `encode_references` and the generator).
"""

from __future__ import annotations

from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, PREFERRED_KONTEXT_RESOLUTIONS, REDUX_SEQUENCE_LENGTH, Limits
from fluxmesh.orchestrator.controlnets import (
    ControlNetFacts,
    ControlNetReference,
    check_controlnet,
    check_controlnet_combination,
    encode_controlnets,
)
from fluxmesh.orchestrator.ip_adapter import IpAdapterReference, check_ip_adapter
from fluxmesh.rpc.errors import FailedPrecondition, InvalidArgument
from fluxmesh.rpc.images import open_image
from fluxmesh.v1 import common_pb2, denoiser_pb2, encoder_pb2, generator_pb2, vae_pb2

__all__ = [
    "Capabilities",
    "ControlReference",
    "KontextReference",
    "ReduxImage",
    "References",
    "check_references",
    "encode_references",
    "kontext_inpaint_size",
    "kontext_size",
]

KONTEXT, CONTROL, REDUX = (
    generator_pb2.REFERENCE_ROLE_KONTEXT,
    generator_pb2.REFERENCE_ROLE_CONTROL,
    generator_pb2.REFERENCE_ROLE_REDUX,
)
IP_ADAPTER, CONTROLNET = generator_pb2.REFERENCE_ROLE_IP_ADAPTER, generator_pb2.REFERENCE_ROLE_CONTROLNET
CANNY, DEPTH = common_pb2.CONTROL_PREPROCESS_CANNY, common_pb2.CONTROL_PREPROCESS_DEPTH


@dataclass(frozen=True)
class Capabilities:
    """What the loaded models can do beyond text to image (from the stages' Info)."""

    kontext: bool = False  # the denoiser holds a FLUX.1-Kontext model
    control: bool = False  # the denoiser holds a FLUX.1 Canny/Depth model (control image channels)
    redux: bool = False  # the encoder has a Redux image encoder (--redux)
    controlnets: tuple[ControlNetFacts, ...] = ()  # the denoiser's ControlNets (--controlnet), in order
    # IP-Adapter: the CLIP embed widths of the encoder's vision model and the denoiser's adapter (0: none)
    ip_adapter_encoder_dim: int = 0
    ip_adapter_denoiser_dim: int = 0
    depth: bool = False  # the vae stage has a depth model (--depth-model): CONTROL_PREPROCESS_DEPTH


@dataclass(frozen=True)
class ReduxImage:
    image: bytes
    scale: float
    pooled_scale: float


@dataclass(frozen=True)
class KontextReference:
    image: bytes
    width: int  # the size the vae stage resizes it to (snapped or kept, rounded to the multiple)
    height: int
    keep_size: bool = False  # diffusers' _auto_resize=False: also for an init image beside it

    @property
    def pixels(self) -> int:
        """What its tokens cost the denoiser, counted as image pixels (the work budget)."""
        return self.width * self.height


@dataclass(frozen=True)
class ControlReference:
    image: bytes
    preprocess: int  # common_pb2.ControlPreprocess


@dataclass(frozen=True)
class References:
    kontext: KontextReference | None = None
    control: ControlReference | None = None
    redux: tuple[ReduxImage, ...] = ()
    controlnets: tuple[ControlNetReference, ...] = ()
    ip_adapter: IpAdapterReference | None = None  # ip_adapter.py

    @property
    def for_vae(self) -> bool:
        return self.kontext is not None or self.control is not None or bool(self.controlnets)


_ROLE_NAMES = {value: name for name, value in generator_pb2.ReferenceRole.items()}
_PROCEEDS = {KONTEXT: "FluxKontextPipeline", CONTROL: "FluxControlPipeline", REDUX: "FluxPriorReduxPipeline"}


def check_references(
    request: generator_pb2.GenerateRequest,
    capabilities: Capabilities,
    *,
    size_multiple: int,
    has_init: bool,
    has_negative: bool,
    has_mask: bool = False,
    fill_model: bool = False,
    limits: Limits = LIMITS,
) -> References:
    """Every reference checked against its role, the others and the models; errors name the field."""
    kontext = control = None
    redux: list[ReduxImage] = []
    controlnets: list[ControlNetReference] = []
    ip_adapter: list[tuple[str, generator_pb2.Reference]] = []
    for i, reference in enumerate(request.references):
        field = f"references[{i}]"
        role = reference.role
        if role not in _ROLE_NAMES or role == generator_pb2.REFERENCE_ROLE_UNSPECIFIED:
            raise InvalidArgument(f"{field}.role", f"{role} is not a served ReferenceRole")
        name = _ROLE_NAMES[role]
        _check_fields_of_role(reference, field, role)
        image = open_image(reference.image, f"{field}.image")
        if role == CONTROLNET:
            _check_preprocess(reference, field, capabilities)
            controlnets.append(check_controlnet(reference, field, capabilities.controlnets, limits))
            continue
        if role == IP_ADAPTER:
            ip_adapter.append((field, reference))
            continue
        if role == KONTEXT:
            if not capabilities.kontext:
                raise FailedPrecondition(
                    f"{field}.role: {name} needs a FLUX.1-Kontext model "
                    "(model_index.json naming FluxKontextPipeline); the loaded model is not one"
                )
            if kontext is not None:
                raise InvalidArgument(f"{field}.role", f"one {name} reference per request ({_PROCEEDS[role]})")
            width, height = kontext_size(image.width, image.height, size_multiple, snap=not reference.keep_size)
            if not size_multiple <= min(width, height) or max(width, height) > limits.max_side:
                raise InvalidArgument(
                    f"{field}.image",
                    f"{image.width}x{image.height} makes a {width}x{height} "
                    f"reference; each side must be within [{size_multiple}, "
                    f"{limits.max_side}]",
                )
            kontext = KontextReference(reference.image, width, height, reference.keep_size)
        elif role == CONTROL:
            if not capabilities.control:
                raise FailedPrecondition(
                    f"{field}.role: {name} needs a FLUX.1 Canny/Depth model (transformer "
                    "in_channels twice its out_channels); the loaded model is not one"
                )
            if control is not None:
                raise InvalidArgument(f"{field}.role", f"one {name} reference per request ({_PROCEEDS[role]})")
            _check_preprocess(reference, field, capabilities)
            control = ControlReference(reference.image, reference.preprocess)
        else:  # REDUX
            if not capabilities.redux:
                raise FailedPrecondition(
                    f"{field}.role: {name} needs the encoder started with --redux FOLDER "
                    "(a FLUX.1-Redux image encoder); it was not"
                )
            if len(redux) == limits.max_redux_images:
                raise InvalidArgument(f"{field}.role", f"more than {limits.max_redux_images} {name} references")
            scales = []
            for scale_field in ("scale", "pooled_scale"):
                value = getattr(reference, scale_field) if reference.HasField(scale_field) else 1.0
                contract.check_redux_scale(f"{field}.{scale_field}", value, limits)
                scales.append(value)
            redux.append(ReduxImage(reference.image, *scales))
    if redux and request.max_sequence_length not in (0, REDUX_SEQUENCE_LENGTH):
        raise InvalidArgument(
            "max_sequence_length",
            f"{request.max_sequence_length}: with REDUX references the T5 "
            f"part is {REDUX_SEQUENCE_LENGTH} tokens, as FluxPriorReduxPipeline's",
        )
    references = References(
        kontext,
        control,
        tuple(redux),
        tuple(controlnets),
        check_ip_adapter(
            ip_adapter,
            encoder_dim=capabilities.ip_adapter_encoder_dim,
            denoiser_dim=capabilities.ip_adapter_denoiser_dim,
            has_negative_prompt=has_negative,
            limits=limits,
        ),
    )
    _check_combinations(references, capabilities, has_init=has_init, has_mask=has_mask, has_negative=has_negative)
    check_controlnet_combination(
        references.controlnets, has_init=has_init, images=request.num_images or 1, limits=limits
    )
    if references.ip_adapter is not None and (references.control is not None or fill_model):
        pipeline = "FluxControlPipeline" if references.control is not None else "FluxFillPipeline"
        raise InvalidArgument("references", f"{pipeline} takes no IP_ADAPTER image prompt")
    if references.ip_adapter is not None and references.controlnets:
        raise InvalidArgument("references", "an IP_ADAPTER image prompt with CONTROLNET references is not served")
    return references


def _check_preprocess(reference: generator_pb2.Reference, field: str, capabilities: Capabilities) -> None:
    """What the server makes of a CONTROL / CONTROLNET image first (vae/control.py)."""
    if reference.preprocess == DEPTH and not capabilities.depth:
        raise FailedPrecondition(
            f"{field}.preprocess: CONTROL_PREPROCESS_DEPTH needs a depth model; none is configured (vae --depth-model)"
        )
    if reference.preprocess not in (common_pb2.CONTROL_PREPROCESS_NONE, CANNY, DEPTH):
        raise InvalidArgument(f"{field}.preprocess", f"{reference.preprocess} is not a ControlPreprocess")


def _check_fields_of_role(reference: generator_pb2.Reference, field: str, role: int) -> None:
    """A field a role does not read is an error, not silently ignored."""
    allowed = {
        KONTEXT: {"keep_size"},
        CONTROL: {"preprocess"},
        REDUX: {"scale", "pooled_scale"},
        CONTROLNET: {"scale", "preprocess", "controlnet_mode", "control_start", "control_end", "controlnet"},
        IP_ADAPTER: {"scale", "negative"},
    }[role]
    for name in ("scale", "pooled_scale", "control_start", "control_end"):
        if name not in allowed and reference.HasField(name):
            raise InvalidArgument(f"{field}.{name}", f"does not apply to a {_ROLE_NAMES[role]} reference")
    for name in ("preprocess", "keep_size", "controlnet_mode", "controlnet", "negative"):
        if name not in allowed and getattr(reference, name):
            raise InvalidArgument(f"{field}.{name}", f"does not apply to a {_ROLE_NAMES[role]} reference")


def _check_combinations(
    references: References, capabilities: Capabilities, *, has_init: bool, has_mask: bool, has_negative: bool
) -> None:
    if capabilities.control and references.control is None:
        raise InvalidArgument(
            "references", "this is a FLUX.1 Canny/Depth model: it needs a REFERENCE_ROLE_CONTROL reference"
        )
    if has_init and not has_mask and references.kontext is not None:
        raise InvalidArgument(
            "mask_image",
            "a KONTEXT reference with an init image is FluxKontextInpaintPipeline: it needs a mask_image "
            "(diffusers has no Kontext image to image)",
        )
    if (references.kontext is not None or references.control is not None) and references.controlnets:
        raise InvalidArgument("references", "CONTROLNET references go with no KONTEXT or CONTROL one")
    if has_negative and references.control is not None:
        raise InvalidArgument("negative_prompt", "FluxControlPipeline has no true CFG")
    if has_negative and references.redux:
        raise InvalidArgument(
            "negative_prompt",
            "true CFG with REDUX image prompts is not served: the negative "
            "prompt has no image tokens to match the prompt's",
        )


def kontext_size(width: int, height: int, multiple: int, *, snap: bool) -> tuple[int, int]:
    """The size FluxKontextPipeline resizes its reference image to: the image's size rounded down to
    the multiple (VaeImageProcessor.get_default_height_width), snapped to the preferred resolution
    of the nearest aspect ratio (unless `snap` is off), rounded down to the multiple again."""
    width, height = width - width % multiple, height - height % multiple
    if snap and width and height:
        aspect_ratio = width / height
        _, width, height = min((abs(aspect_ratio - w / h), w, h) for w, h in PREFERRED_KONTEXT_RESOLUTIONS)
    return width // multiple * multiple, height // multiple * multiple


def kontext_inpaint_size(
    image_width: int,
    image_height: int,
    kontext: KontextReference,
    *,
    width: int,
    height: int,
    size_multiple: int,
    limits: Limits = LIMITS,
) -> tuple[int, int]:
    """FluxKontextInpaintPipeline paints at its init image's size, made as the reference's is
    (rounded down, snapped unless keep_size: the pipeline has one _auto_resize for both); the
    width and height it is called with are overridden by it, so a request asking another size is
    refused rather than silently ignored."""
    size = kontext_size(image_width, image_height, size_multiple, snap=not kontext.keep_size)
    if not size_multiple <= min(size) or max(size) > limits.max_side:
        raise InvalidArgument(
            "init_image",
            f"{image_width}x{image_height} makes a {size[0]}x{size[1]} image to inpaint; "
            f"each side must be within [{size_multiple}, {limits.max_side}]",
        )
    if (width or height) and (width, height) != size:
        raise InvalidArgument(
            "width",
            f"{width}x{height}: with a KONTEXT reference FluxKontextInpaintPipeline paints at the init image's "
            f"size, here {size[0]}x{size[1]}; leave width and height unset",
        )
    return size


def encoder_image_prompts(references: References) -> list[encoder_pb2.ImagePrompt]:
    return [
        encoder_pb2.ImagePrompt(image=r.image, scale=r.scale, pooled_scale=r.pooled_scale) for r in references.redux
    ]


async def encode_references(
    vae, references: References, *, width: int, height: int, timeout: float | None
) -> denoiser_pb2.Conditioning | None:
    """KONTEXT, CONTROL and CONTROLNET images through the vae stage's Encode (the caller holds the vae's turn)."""
    if not references.for_vae:
        return None
    conditioning = denoiser_pb2.Conditioning()
    if references.kontext is not None:
        kontext = references.kontext
        encoded = await vae.encode_image(
            vae_pb2.EncodeImageRequest(image=kontext.image, width=kontext.width, height=kontext.height), timeout
        )
        conditioning.kontext_latents.CopyFrom(encoded.latents)  # the posterior mode: Kontext's "argmax"
    if references.control is not None:
        encoded = await vae.encode_image(
            vae_pb2.EncodeImageRequest(
                image=references.control.image, width=width, height=height, preprocess=references.control.preprocess
            ),
            timeout,
        )
        conditioning.control_posterior.CopyFrom(encoded.posterior)  # sampled in the denoiser, as the pipeline does
    conditioning.controlnets.extend(
        await encode_controlnets(vae, references.controlnets, width=width, height=height, timeout=timeout)
    )
    return conditioning
