"""Validate a GenerateRequest up front, before any stage is called: every field, against the
request contract (fluxmesh.contract) and the model's facts; errors name the field and show the value.

Image to image, inpainting and Fill: the init image (and mask) are decoded and checked here —
PNG/JPEG, within size limits, the mask one channel and the init image's size, strength in (0, 1]
and leaving at least one step — and sent to the vae stage as they came. As in the diffusers
pipelines the init image is resized to width x height; a request that leaves width/height at 0
gets the init image's size (scaled down to fit max_side if larger, rounded down to the model's
size multiple).
"""

from __future__ import annotations

import asyncio
import functools
import math
import secrets
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits, PreviewKind
from fluxmesh.orchestrator.references import Capabilities, References, check_references, kontext_inpaint_size
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.rpc.images import check_mask, open_image
from fluxmesh.v1 import generator_pb2

DEFAULT_SIDE = 1024
DEFAULT_GUIDANCE = 3.5
DEFAULT_STEPS_DEV, DEFAULT_STEPS_SCHNELL = 28, 4
DEFAULT_STRENGTH = 0.6  # FluxImg2ImgPipeline's and FluxInpaintPipeline's default
DEFAULT_FILL_STRENGTH = 1.0  # FluxFillPipeline's default: Fill models repaint from noise
DEFAULT_KONTEXT_INPAINT_STRENGTH = 1.0  # FluxKontextInpaintPipeline's default


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the model the stages serve."""

    size_multiple: int = 16
    guidance_embeds: bool = True
    fill: bool = False  # a FLUX.1-Fill model: every request needs an init image and a mask
    capabilities: Capabilities = Capabilities()  # Kontext / Control / Redux (see references.py)


@dataclass(frozen=True)
class TrueCfg:
    """FluxPipeline's true classifier-free guidance: the negative prompt runs at every step too."""

    negative_prompt: str
    negative_prompt_2: str
    scale: float


@dataclass(frozen=True)
class GenerateParams:
    prompt: str
    prompt_2: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    max_sequence_length: int
    loras: tuple[tuple[str, float], ...] = ()
    edit: EditParams | None = None  # image to image / inpainting / Fill
    preview: PreviewParams | None = None
    true_cfg: TrueCfg | None = None
    references: References = References()


@functools.cache
def _decoder() -> ThreadPoolExecutor:
    """One thread decodes init images, masks and reference images, one request after another:
    decoding holds the GIL in part, and several decoding threads at once starved the event loop
    of it (health checks took seconds on two cores); it also bounds the decoded pixels held at once."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-decode")


async def check_request(
    request: generator_pb2.GenerateRequest, model: ModelFacts, limits: Limits = LIMITS
) -> GenerateParams:
    """Fill defaults and validate every field against `limits`; errors name the field and show the value.

    Cheap checks first, on the event loop (a million-entry LoRA list is refused by its length,
    before it is walked); then the images are decoded on a worker thread, so one request cannot
    stall the loop that serves health checks and every other client; last the size and the work
    budget, which may need the init image's size."""
    # one Kontext, one Control, the Redux and ControlNet images, an IP-Adapter image and its
    # negative: counted before walked
    most = 4 + limits.max_redux_images + limits.max_controlnet_images
    if len(request.references) > most:
        raise InvalidArgument("references", f"{len(request.references)} references; at most {most} per request")
    has_redux = any(r.role == generator_pb2.REFERENCE_ROLE_REDUX for r in request.references)
    if not request.prompt.strip() and not (has_redux and not request.prompt_2):
        # Redux alone may go without one: zero text embeddings, as FluxPriorReduxPipeline without text encoders
        raise InvalidArgument("prompt", "must not be empty" + ("" if not has_redux else " when prompt_2 is set"))
    for field in ("prompt", "prompt_2"):
        contract.check_prompt_text(field, getattr(request, field), limits)
    loras = contract.check_loras(request.loras, limits=limits)
    init_image, mask_image = request.init_image, request.mask_image
    has_kontext = any(r.role == generator_pb2.REFERENCE_ROLE_KONTEXT for r in request.references)
    strength = check_edit(request, init_image, mask_image, fill_model=model.fill, kontext_reference=has_kontext)
    default_steps = DEFAULT_STEPS_DEV if model.guidance_embeds else DEFAULT_STEPS_SCHNELL
    steps = request.steps if request.HasField("steps") else default_steps
    contract.check_steps(steps, limits)
    if strength is not None:
        contract.check_strength_leaves_a_step(strength, steps)
    preview = check_preview(request, limits)
    guidance = request.guidance if request.HasField("guidance") else DEFAULT_GUIDANCE
    contract.check_guidance(guidance, limits=limits)
    num_images = request.num_images or 1
    contract.check_num_images(num_images, limits=limits)
    contract.check_sequence_length("max_sequence_length", request.max_sequence_length, limits, zero_is_default=True)
    true_cfg = check_true_cfg(request, fill_model=model.fill, limits=limits)
    if request.width and request.height:  # before decoding anything, when the request says
        contract.check_size(request.width, request.height, model.size_multiple, limits)

    def decode() -> tuple[EditParams | None, References]:
        edit = (
            None
            if strength is None
            else decode_edit(
                init_image,
                mask_image,
                strength,
                fill_model=model.fill,
                size_multiple=model.size_multiple,
                limits=limits,
            )
        )
        references = check_references(
            request,
            model.capabilities,
            size_multiple=model.size_multiple,
            has_init=bool(init_image),
            has_mask=bool(mask_image),
            has_negative=request.HasField("negative_prompt"),
            fill_model=model.fill,
            limits=limits,
        )
        return edit, references

    if strength is None and not len(request.references):
        edit, references = decode()  # nothing to decode
    else:
        edit, references = await asyncio.get_running_loop().run_in_executor(_decoder(), decode)
    # unset sides: the init image's, else a Kontext reference's (as the reference implementation edits), else 1024
    kontext = references.kontext
    width = request.width or (edit.width if edit else kontext.width if kontext else DEFAULT_SIDE)
    height = request.height or (edit.height if edit else kontext.height if kontext else DEFAULT_SIDE)
    if kontext is not None and edit is not None:  # FluxKontextInpaintPipeline: the init image's size
        width, height = kontext_inpaint_size(
            *edit.image_size,
            kontext,
            width=request.width,
            height=request.height,
            size_multiple=model.size_multiple,
            limits=limits,
        )
    steps_run = contract.steps_after_strength(steps, strength) if strength is not None else steps
    contract.check_admissible(
        width,
        height,
        num_images,
        steps_run,
        true_cfg is not None,
        model.size_multiple,
        limits,
        reference_pixels=kontext.pixels if kontext else 0,  # Kontext's reference tokens join the image's
    )
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    return GenerateParams(
        prompt=request.prompt,
        prompt_2=request.prompt_2,
        width=width,
        height=height,
        steps=steps,
        guidance=guidance,
        seed=seed,
        num_images=num_images,
        max_sequence_length=request.max_sequence_length,
        loras=loras,
        edit=edit,
        preview=preview,
        true_cfg=true_cfg,
        references=references,
    )


def check_true_cfg(
    request: generator_pb2.GenerateRequest, *, fill_model: bool, limits: Limits = LIMITS
) -> TrueCfg | None:
    """A negative prompt and a scale > 1 go together: diffusers silently ignores either one alone,
    here it is an error naming the field that is missing."""
    for field in ("negative_prompt", "negative_prompt_2"):
        contract.check_prompt_text(field, getattr(request, field), limits)
    has_negative = request.HasField("negative_prompt")
    scale = request.true_cfg_scale if request.HasField("true_cfg_scale") else 1.0
    contract.check_true_cfg_scale(scale, limits)
    if request.negative_prompt_2 and not has_negative:
        raise InvalidArgument("negative_prompt_2", "needs negative_prompt as well")
    if has_negative and scale == 1.0:
        raise InvalidArgument("true_cfg_scale", "a negative prompt takes effect only with true_cfg_scale > 1")
    if scale > 1.0 and not has_negative:
        raise InvalidArgument("negative_prompt", f"true_cfg_scale {scale:g} needs a negative prompt (it may be empty)")
    if not has_negative:
        return None
    if fill_model:
        raise InvalidArgument("true_cfg_scale", "FLUX.1-Fill models have no true CFG (FluxFillPipeline)")
    return TrueCfg(request.negative_prompt, request.negative_prompt_2, scale)


@dataclass(frozen=True)
class EditParams:
    init_image: bytes
    mask_image: bytes  # empty: image to image
    strength: float
    width: int  # the init image's own size, fitted to the model (used when the request gives 0)
    height: int
    fill: bool = False  # a FLUX.1-Fill model: the vae stage makes the masked image as FluxFillPipeline does
    image_size: tuple[int, int] = (0, 0)  # the init image's own (FluxKontextInpaintPipeline sizes by it)

    @property
    def inpainting(self) -> bool:
        return bool(self.mask_image)


@dataclass(frozen=True)
class PreviewParams:
    kind: PreviewKind
    every: int


def check_edit(
    request: generator_pb2.GenerateRequest,
    init_image: bytes,
    mask_image: bytes,
    *,
    fill_model: bool,
    kontext_reference: bool = False,
) -> float | None:
    """The cheap part, on the event loop: which fields go together, and the strength. None for
    text to image; errors name the field. The images (read from the request once: each read of
    a bytes field is a copy) are decoded by `decode_edit`."""
    has_strength = request.HasField("strength")
    if not init_image:
        if mask_image:
            raise InvalidArgument("mask_image", "needs an init_image to repaint")
        if has_strength:
            raise InvalidArgument("strength", "applies only with an init_image")
        if fill_model:
            raise InvalidArgument("init_image", "this is a FLUX.1-Fill model: it needs an init_image and a mask_image")
        return None
    if fill_model and not mask_image:
        raise InvalidArgument("mask_image", "this is a FLUX.1-Fill model: it needs a mask_image")
    default = DEFAULT_FILL_STRENGTH if fill_model else DEFAULT_KONTEXT_INPAINT_STRENGTH if kontext_reference else None
    strength = as_typed(request.strength) if has_strength else default or DEFAULT_STRENGTH
    contract.check_strength(strength)
    return strength


def decode_edit(
    init_image: bytes,
    mask_image: bytes,
    strength: float,
    *,
    fill_model: bool,
    size_multiple: int,
    limits: Limits = LIMITS,
) -> EditParams:
    """Decode and check the init image and mask: CPU work (a 4096x4096 PNG takes a good part of
    a second), so callers run it off the event loop."""
    init = open_image(init_image, "init_image")
    if mask_image:
        check_mask(open_image(mask_image, "mask_image"), init, "mask_image")
    width, height = contract.fit_size(init.width, init.height, size_multiple, limits)
    return EditParams(init_image, mask_image, strength, width, height, fill_model, (init.width, init.height))


def as_typed(value: float) -> float:
    """The shortest decimal that is the same float32 as `value`: the number the client typed.

    strength is a float32 on the public API, so 0.8 arrives as 0.800000011920929, and the steps
    an img2img pipeline runs are int(steps * strength)-based: 5 * 0.8000000119 runs 5 steps
    where diffusers, given 0.8, runs 4."""
    if not math.isfinite(value):
        return value
    for digits in range(1, 10):
        decimal = float(f"{value:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", decimal))[0] == value:
            return decimal
    return value


def check_preview(request: generator_pb2.GenerateRequest, limits: Limits = LIMITS) -> PreviewParams | None:
    kind = PreviewKind.from_pb(request.preview.kind)
    contract.check_preview_every(request.preview.every, limits)
    return PreviewParams(kind, request.preview.every or 1) if kind else None
