"""Validate a GenerateRequest up front, before any stage is called."""

from __future__ import annotations

import asyncio
import functools
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.orchestrator.editing import EditParams, PreviewParams, check_edit, check_preview, decode_edit
from fluxmesh.orchestrator.references import Capabilities, References, check_references
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import generator_pb2

DEFAULT_SIDE = 1024
DEFAULT_GUIDANCE = 3.5
DEFAULT_STEPS_DEV, DEFAULT_STEPS_SCHNELL = 28, 4


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


async def check_request(request: generator_pb2.GenerateRequest, model: ModelFacts,
                        limits: Limits = LIMITS) -> GenerateParams:
    """Fill defaults and validate every field against `limits`; errors name the field and show the value.

    Cheap checks first, on the event loop (a million-entry LoRA list is refused by its length,
    before it is walked); then the images are decoded on a worker thread, so one request cannot
    stall the loop that serves health checks and every other client; last the size and the work
    budget, which may need the init image's size."""
    most = 2 + limits.max_redux_images  # one Kontext, one Control, the Redux images: counted before walked
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
    strength = check_edit(request, init_image, mask_image, fill_model=model.fill)
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
        edit = None if strength is None else decode_edit(init_image, mask_image, strength, fill_model=model.fill,
                                                          size_multiple=model.size_multiple, limits=limits)
        references = check_references(request, model.capabilities, size_multiple=model.size_multiple,
                                      has_init=bool(init_image), has_negative=request.HasField("negative_prompt"),
                                      limits=limits)
        return edit, references

    if strength is None and not len(request.references):
        edit, references = decode()  # nothing to decode
    else:
        edit, references = await asyncio.get_running_loop().run_in_executor(_decoder(), decode)
    # unset sides: the init image's, else a Kontext reference's (as the reference implementation edits), else 1024
    kontext = references.kontext
    width = request.width or (edit.width if edit else kontext.width if kontext else DEFAULT_SIDE)
    height = request.height or (edit.height if edit else kontext.height if kontext else DEFAULT_SIDE)
    steps_run = contract.steps_after_strength(steps, strength) if strength is not None else steps
    contract.check_admissible(width, height, num_images, steps_run, true_cfg is not None, model.size_multiple, limits)
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


def check_true_cfg(request: generator_pb2.GenerateRequest, *, fill_model: bool,
                   limits: Limits = LIMITS) -> TrueCfg | None:
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

