"""Validate a GenerateRequest up front, before any stage is called."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

from fluxmesh.orchestrator.editing import EditParams, PreviewParams, check_edit, check_preview, check_steps
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import generator_pb2
from fluxmesh.rpc.limits import (MAX_IMAGES, MAX_LORA_WEIGHT, MAX_PROMPT_CHARS, MAX_SIDE, MAX_STEPS,
                                 MAX_TRUE_CFG_SCALE, MIN_SIDE)

DEFAULT_SIDE = 1024
DEFAULT_GUIDANCE = 3.5
DEFAULT_STEPS_DEV, DEFAULT_STEPS_SCHNELL = 28, 4


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the model the stages serve."""

    size_multiple: int = 16
    guidance_embeds: bool = True
    fill: bool = False  # a FLUX.1-Fill model: every request needs an init image and a mask


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


def check_request(request: generator_pb2.GenerateRequest, model: ModelFacts) -> GenerateParams:
    """Fill defaults and validate every field; errors name the field and show the value."""
    if not request.prompt.strip():
        raise InvalidArgument("prompt", "must not be empty")
    for field, text in (("prompt", request.prompt), ("prompt_2", request.prompt_2)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidArgument(field, f"{len(text)} characters; the limit is {MAX_PROMPT_CHARS}")
    edit = check_edit(request, fill_model=model.fill, size_multiple=model.size_multiple, min_side=MIN_SIDE,
                      max_side=MAX_SIDE)
    width = request.width or (edit.width if edit else DEFAULT_SIDE)
    height = request.height or (edit.height if edit else DEFAULT_SIDE)
    for field, value in (("width", width), ("height", height)):
        if not MIN_SIDE <= value <= MAX_SIDE or value % model.size_multiple:
            raise InvalidArgument(
                field, f"{value} must be a multiple of {model.size_multiple} within [{MIN_SIDE}, {MAX_SIDE}]"
            )
    default_steps = DEFAULT_STEPS_DEV if model.guidance_embeds else DEFAULT_STEPS_SCHNELL
    steps = request.steps if request.HasField("steps") else default_steps
    if not 1 <= steps <= MAX_STEPS:
        raise InvalidArgument("steps", f"{steps} is outside [1, {MAX_STEPS}]")
    check_steps(edit, steps)
    preview = check_preview(request, MAX_STEPS)
    guidance = request.guidance if request.HasField("guidance") else DEFAULT_GUIDANCE
    if not math.isfinite(guidance):
        raise InvalidArgument("guidance", f"{guidance} is not finite")
    num_images = request.num_images or 1
    if not 1 <= num_images <= MAX_IMAGES:
        raise InvalidArgument("num_images", f"{num_images} is outside [1, {MAX_IMAGES}]")
    if not 0 <= request.max_sequence_length <= 512:
        raise InvalidArgument("max_sequence_length", f"{request.max_sequence_length} is outside [0, 512]")
    seed = request.seed if request.HasField("seed") else secrets.randbits(63)
    loras = check_loras(request.loras)
    true_cfg = check_true_cfg(request, fill_model=model.fill)
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
    )


def check_true_cfg(request: generator_pb2.GenerateRequest, *, fill_model: bool) -> TrueCfg | None:
    """A negative prompt and a scale > 1 go together: diffusers silently ignores either one alone,
    here it is an error naming the field that is missing."""
    for field in ("negative_prompt", "negative_prompt_2"):
        if len(getattr(request, field)) > MAX_PROMPT_CHARS:
            raise InvalidArgument(field, f"{len(getattr(request, field))} characters; the limit is {MAX_PROMPT_CHARS}")
    has_negative = request.HasField("negative_prompt")
    scale = request.true_cfg_scale if request.HasField("true_cfg_scale") else 1.0
    if not math.isfinite(scale) or not 1.0 <= scale <= MAX_TRUE_CFG_SCALE:
        raise InvalidArgument("true_cfg_scale", f"{scale} must be finite within [1, {MAX_TRUE_CFG_SCALE:g}]")
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


def check_loras(loras) -> tuple[tuple[str, float], ...]:
    """Shape checks the orchestrator can do alone; the stages resolve names in their LoRA directory."""
    seen = set()
    for i, lora in enumerate(loras):
        if not lora.name:
            raise InvalidArgument(f"loras[{i}].name", "must not be empty")
        if not math.isfinite(lora.weight) or abs(lora.weight) > MAX_LORA_WEIGHT:
            raise InvalidArgument(f"loras[{i}].weight", f"{lora.weight} must be finite within [-4, 4]")
        if lora.name in seen:
            raise InvalidArgument(f"loras[{i}].name", f"{lora.name!r} is listed twice")
        seen.add(lora.name)
    return tuple((lora.name, lora.weight) for lora in loras)
