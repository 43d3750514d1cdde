"""Validate a GenerateRequest up front, before any stage is called."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fluxmesh import contract
from fluxmesh.contract import LIMITS, Limits
from fluxmesh.orchestrator.editing import EditParams, PreviewParams, check_edit, check_preview
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


def check_request(request: generator_pb2.GenerateRequest, model: ModelFacts,
                  limits: Limits = LIMITS) -> GenerateParams:
    """Fill defaults and validate every field against `limits`; errors name the field and show the value."""
    has_redux = any(r.role == generator_pb2.REFERENCE_ROLE_REDUX for r in request.references)
    if not request.prompt.strip() and not (has_redux and not request.prompt_2):
        # Redux alone may go without one: zero text embeddings, as FluxPriorReduxPipeline without text encoders
        raise InvalidArgument("prompt", "must not be empty" + ("" if not has_redux else " when prompt_2 is set"))
    for field in ("prompt", "prompt_2"):
        contract.check_prompt_text(field, getattr(request, field), limits)
    edit = check_edit(request, fill_model=model.fill, size_multiple=model.size_multiple, limits=limits)
    references = check_references(request, model.capabilities, size_multiple=model.size_multiple,
                                  has_init=bool(request.init_image), has_negative=request.HasField("negative_prompt"),
                                  limits=limits)
    # unset sides: the init image's, else a Kontext reference's (as the reference implementation edits), else 1024
    kontext = references.kontext
    width = request.width or (edit.width if edit else kontext.width if kontext else DEFAULT_SIDE)
    height = request.height or (edit.height if edit else kontext.height if kontext else DEFAULT_SIDE)
    contract.check_size(width, height, model.size_multiple, limits)
    default_steps = DEFAULT_STEPS_DEV if model.guidance_embeds else DEFAULT_STEPS_SCHNELL
    steps = request.steps if request.HasField("steps") else default_steps
    contract.check_steps(steps, limits)
    if edit is not None:
        contract.check_strength_leaves_a_step(edit.strength, steps)
    preview = check_preview(request, limits)
    guidance = request.guidance if request.HasField("guidance") else DEFAULT_GUIDANCE
    contract.check_guidance(guidance)
    num_images = request.num_images or 1
    contract.check_num_images(num_images, limits=limits)
    contract.check_sequence_length("max_sequence_length", request.max_sequence_length, limits, zero_is_default=True)
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    loras = contract.check_loras(request.loras, limits=limits)
    true_cfg = check_true_cfg(request, fill_model=model.fill, limits=limits)
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

