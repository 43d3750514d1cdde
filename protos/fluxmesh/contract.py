"""The request contract every fluxmesh process shares: limits, rules and closed vocabularies.

The orchestrator checks a request against it first, each stage again on what it receives (a
stage may be driven by something other than our orchestrator), and the SDK and CLI take their
choices from it: one module, so the processes can never disagree. Torch-free and cheap to import
(the orchestrator, SDK and CLI never import torch); stages pass plain values (a tensor's dtype
as its name, its shape as ints).

Every check raises `InvalidArgument(field, reason)`: the message starts with the field's name
and shows the value.

Ceilings live in `Limits`. `LIMITS` holds today's values; a process whose operator lowers a
ceiling builds its own `Limits` (`LIMITS.lowered(max_side=1024)`) and passes it to the checks,
which all take `limits=` for that reason. The per-request work budget belongs there too.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePath
from typing import Any

from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.v1 import common_pb2, generator_pb2, residency_pb2

__all__ = [
    "LIMITS",
    "Limits",
    "Stage",
    "Phase",
    "PreviewKind",
    "WeightState",
    "ReleaseTo",
    "StartResidency",
    "FLOAT_DTYPES",
    "WIRE_DTYPES",
    "check_side",
    "check_size",
    "check_steps",
    "check_num_images",
    "check_guidance",
    "check_prompt_text",
    "check_prompt_count",
    "check_sequence_length",
    "check_strength",
    "steps_after_strength",
    "check_strength_leaves_a_step",
    "check_true_cfg_scale",
    "check_lora_weight",
    "check_loras",
    "check_preview_every",
    "model_id",
    "check_float_dtype",
    "fit_size",
    "REDUX_SEQUENCE_LENGTH",
    "check_redux_scale",
    "check_controlnet_scale",
    "check_control_span",
    "check_ip_adapter_scale",
    "check_union_controlnet_batch",
    "check_conditioning_length",
    "PREFERRED_KONTEXT_RESOLUTIONS",
    "MEGAPIXEL",
    "request_work",
    "check_work",
    "check_admissible",
    "ReferenceRole",
    "ControlPreprocess",
]


# -- ceilings ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The ceilings a request is held to. Defaults are the project's; operators may only lower them."""

    min_side: int = 64  # pixels; a side is also a multiple of the model's size granularity
    max_side: int = 2048
    max_steps: int = 100
    max_images: int = 8  # per request, prompts x images
    max_prompts: int = 8  # one encoder batch: as many as the denoiser takes
    max_prompt_chars: int = 20_000
    max_sequence_length: int = 512  # T5 tokens (attention cost grows with its square)
    max_lora_weight: float = 4.0
    max_loras: int = 8  # per request (a stage's LoRA cache holds 8 by default)
    max_true_cfg_scale: float = 30.0  # FluxPipeline's true_cfg_scale; 1 is off
    max_redux_images: int = 4  # FluxPriorReduxPipeline image prompts per request (their entries are summed)
    max_redux_scale: float = 4.0  # its prompt_embeds_scale / pooled_prompt_embeds_scale
    max_controlnet_images: int = 4  # CONTROLNET references per request (one ControlNet forward each, per step)
    max_controlnet_scale: float = 2.0  # controlnet_conditioning_scale
    # set_ip_adapter_scale's: XLabs suggest 0.5-1; past 2 the image prompt drowns the text
    max_ip_adapter_scale: float = 2.0
    max_image_prompt_tokens: int = 1024  # tokens an image prompt appends to T5's (Redux's SigLIP at 384 px: 729)
    # FLUX.1 distilled guidance (dev 3.5, Fill 30). Beyond ~100 the embedding's guidance x 1000
    # overflows and the latents turn to NaN after a whole denoise.
    max_guidance: float = 100.0
    # The per-request work budget, in megapixel-steps (`request_work`): what one request may cost
    # the denoiser. 400 is 1024x1024 x 4 images x 50 steps with true CFG, or 2048x2048 x 100 steps.
    max_work: float = 400.0

    def lowered(self, **ceilings: float) -> Limits:
        """These limits with some ceilings lowered (an operator's flags); raising one is refused,
        so no flag can let through what the stages were never built to take."""
        for name, value in ceilings.items():
            if name == "min_side" or name not in _CEILINGS:
                raise InvalidArgument(name, "is not a ceiling that can be lowered")
            if not 0 < value <= getattr(self, name):
                raise InvalidArgument(name, f"{value} must be within (0, {getattr(self, name)}]")
        return dataclasses.replace(self, **ceilings)


_CEILINGS = {f.name for f in dataclasses.fields(Limits)}
LIMITS = Limits()

# The denoiser's --max-batch when none is given (here, not in the denoiser, so the CLI's help
# states it without importing torch). Chosen from bench/throughput.py's serving section (figures
# in docs/benchmarks.md, "Throughput under load"): on a 2-core CPU, at 8 concurrent clients,
# batches of 2 kept p50 below the serial denoiser's in every run, with about the images/s of
# batches of 4, which finish their requests late together and send their decodes to the vae at
# once. A GPU, where a forward of 4 costs well under 4 of 1, is expected to favour more.
DEFAULT_MAX_BATCH = 2


# -- closed vocabularies ----------------------------------------------------------------------


class Stage(StrEnum):
    """The three stage services (process, --stage name, Residency stage)."""

    encoder = "encoder"
    denoiser = "denoiser"
    vae = "vae"


class Phase(StrEnum):
    """What a request goes through, in order; each runs on one stage."""

    encode = "encode"
    denoise = "denoise"
    decode = "decode"

    @property
    def stage(self) -> Stage:
        return _STAGE_OF[self]

    @property
    def pb(self) -> int:
        """The generator_pb2.StageKind value events carry."""
        return _PHASE_PB[self]

    @classmethod
    def from_pb(cls, value: int) -> Phase:
        return _PHASE_FROM_PB[value]


_STAGE_OF = {Phase.encode: Stage.encoder, Phase.denoise: Stage.denoiser, Phase.decode: Stage.vae}
_PHASE_PB = {
    Phase.encode: generator_pb2.STAGE_ENCODE,
    Phase.denoise: generator_pb2.STAGE_DENOISE,
    Phase.decode: generator_pb2.STAGE_DECODE,
}
_PHASE_FROM_PB = {v: k for k, v in _PHASE_PB.items()}


class PreviewKind(StrEnum):
    """Live previews: fast (latents -> RGB by a linear map, in the denoiser) or vae (x0 decoded)."""

    fast = "fast"
    vae = "vae"

    @property
    def pb(self) -> int:
        return _PREVIEW_PB[self]

    @classmethod
    def from_pb(cls, value: int, field: str = "preview.kind") -> PreviewKind | None:
        """None for PREVIEW_KIND_UNSPECIFIED (no previews)."""
        if value == generator_pb2.PREVIEW_KIND_UNSPECIFIED:
            return None
        for kind, number in _PREVIEW_PB.items():
            if number == value:
                return kind
        raise InvalidArgument(field, f"{value} is not a PreviewKind")

    @classmethod
    def parse(cls, text: str, field: str = "preview") -> PreviewKind:
        try:
            return cls(text)
        except ValueError:
            raise InvalidArgument(field, f"{text!r}; expected one of {', '.join(cls)}") from None


_PREVIEW_PB = {PreviewKind.fast: generator_pb2.PREVIEW_KIND_FAST, PreviewKind.vae: generator_pb2.PREVIEW_KIND_VAE}


class ReferenceRole(StrEnum):
    """What a reference image is for (GenerateRequest.references; see docs/family.md)."""

    kontext = "kontext"  # FLUX.1-Kontext: the image to edit
    control = "control"  # FLUX.1-Canny/Depth: the control image
    redux = "redux"  # FLUX.1-Redux: an image prompt
    ip_adapter = "ip-adapter"  # XLabs IP-Adapter: an image prompt (FluxIPAdapterMixin)
    controlnet = "controlnet"  # a ControlNet's control image (the denoiser's --controlnet)

    @property
    def pb(self) -> int:
        return int(generator_pb2.ReferenceRole.Value(f"REFERENCE_ROLE_{self.name.upper()}"))

    @classmethod
    def parse(cls, text: str, field: str = "role") -> ReferenceRole:
        try:
            return cls(text)
        except ValueError:
            raise InvalidArgument(field, f"{text!r}; expected one of {', '.join(cls)}") from None


class ControlPreprocess(StrEnum):
    """Server-side preprocessing of a control image."""

    none = "none"
    canny = "canny"  # OpenCV Canny edges (thresholds 100/200, as controlnet_aux's CannyDetector)
    depth = "depth"  # a depth map by the vae stage's depth model (serve vae --depth-model)

    @property
    def pb(self) -> int:
        return int(common_pb2.ControlPreprocess.Value(f"CONTROL_PREPROCESS_{self.name.upper()}"))

    @classmethod
    def parse(cls, text: str, field: str = "preprocess") -> ControlPreprocess:
        try:
            return cls(text)
        except ValueError:
            raise InvalidArgument(field, f"{text!r}; expected one of {', '.join(cls)}") from None


# -- weight residency -------------------------------------------------------------------------


class WeightState(StrEnum):
    """Where a stage's weights are (fluxmesh.v1.Residency)."""

    resident = "resident"  # on the stage's device: model calls run
    offloaded = "offloaded"  # in CPU memory (on a CPU stage: the same memory, nothing moves)
    released = "released"  # not held; loading reads the model files again


class ReleaseTo(StrEnum):
    """Sequential mode: where a stage's weights go when it gives up the accelerator."""

    auto = "auto"  # cpu for stages on an accelerator, disk for stages on the CPU
    cpu = "cpu"  # keep released weights in CPU memory (offloaded)
    disk = "disk"  # free them entirely (released); read the model files again on the next load

    def on(self, device: str) -> ReleaseTo:
        """The choice for a stage on `device` ("cpu", "cuda:0", "mps"). The auto rule, once: on
        the CPU, "CPU memory" is the very memory being freed, so auto drops the weights."""
        if self is not ReleaseTo.auto:
            return self
        return ReleaseTo.disk if device.partition(":")[0] == "cpu" else ReleaseTo.cpu

    def state(self, device: str) -> WeightState:
        """The state a release leaves a stage on `device` in."""
        return WeightState.offloaded if self.on(device) is ReleaseTo.cpu else WeightState.released

    @property
    def pb(self) -> int:
        """The residency_pb2.ReleaseTo value a ReleaseRequest carries."""
        return _RELEASE_PB[self]

    @classmethod
    def from_request(cls, request: residency_pb2.ReleaseRequest) -> ReleaseTo:
        """A ReleaseRequest's choice; one from an orchestrator that only sets the older
        keep_in_cpu_memory reads as cpu (true) or disk (false)."""
        if request.release_to == residency_pb2.RELEASE_TO_UNSPECIFIED:
            return cls.cpu if request.keep_in_cpu_memory else cls.disk
        return next(kind for kind, number in _RELEASE_PB.items() if number == request.release_to)


_RELEASE_PB = {
    ReleaseTo.auto: residency_pb2.RELEASE_TO_AUTO,
    ReleaseTo.cpu: residency_pb2.RELEASE_TO_CPU,
    ReleaseTo.disk: residency_pb2.RELEASE_TO_DISK,
}


class StartResidency(StrEnum):
    """A stage's weights at start-up (`--residency`): a WeightState, or standby."""

    resident = "resident"
    offloaded = "offloaded"
    released = "released"
    standby = "standby"  # where ReleaseTo.auto leaves weights; the stage applies it (it knows its device)

    @classmethod
    def for_release(cls, release_to: ReleaseTo) -> StartResidency:
        """How stages start in sequential mode: as a release would leave them, so they never
        all load at once."""
        return cls.standby if release_to is ReleaseTo.auto else cls(release_to.state("any"))

    def state(self, device: str) -> WeightState:
        return ReleaseTo.auto.state(device) if self is StartResidency.standby else WeightState(self)


# -- tensors ----------------------------------------------------------------------------------

FLOAT_DTYPES = ("bfloat16", "float16", "float32")
WIRE_DTYPES = (*FLOAT_DTYPES, "uint8")  # what a fluxmesh.v1.Tensor may carry


def check_float_dtype(field: str, dtype: str) -> None:
    """`dtype` as a wire name or torch's str() ("torch.float32")."""
    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_DTYPES:
        raise InvalidArgument(field, f"{name} is not a float dtype")


# -- sizes, steps, counts ---------------------------------------------------------------------


def check_side(field: str, value: int, multiple: int, limits: Limits = LIMITS) -> None:
    """A side in pixels: a multiple of the model's size granularity within [min_side, max_side]."""
    if value % multiple or not limits.min_side <= value <= limits.max_side:
        raise InvalidArgument(
            field, f"{value} must be a multiple of {multiple} within [{limits.min_side}, {limits.max_side}]"
        )


def check_size(width: int, height: int, multiple: int, limits: Limits = LIMITS) -> None:
    check_side("width", width, multiple, limits)
    check_side("height", height, multiple, limits)


def fit_size(width: int, height: int, multiple: int, limits: Limits = LIMITS) -> tuple[int, int]:
    """An image's size as a request size: scaled down (aspect kept) to fit max_side, then
    rounded down to the size multiple (as VaeImageProcessor does), at least min_side."""
    scale = min(1.0, limits.max_side / max(width, height))
    fitted = []
    for side in (width, height):
        side = math.floor(side * scale)
        fitted.append(max(limits.min_side, side - side % multiple))
    return fitted[0], fitted[1]


def check_steps(steps: int, limits: Limits = LIMITS, field: str = "steps") -> None:
    if not 1 <= steps <= limits.max_steps:
        raise InvalidArgument(field, f"{steps} is outside [1, {limits.max_steps}]")


def check_num_images(num_images: int, prompts: int = 1, limits: Limits = LIMITS) -> None:
    """Images per prompt, and prompts x images: one denoiser batch."""
    if not 1 <= num_images <= limits.max_images:
        raise InvalidArgument("num_images", f"{num_images} is outside [1, {limits.max_images}]")
    if prompts * num_images > limits.max_images:
        raise InvalidArgument("num_images", f"{prompts} prompts x {num_images} images exceeds {limits.max_images}")


def check_guidance(guidance: float, field: str = "guidance", limits: Limits = LIMITS) -> None:
    if not math.isfinite(guidance) or not 0.0 <= guidance <= limits.max_guidance:
        raise InvalidArgument(field, f"{guidance:g} must be finite within [0, {limits.max_guidance:g}]")


# -- the work budget --------------------------------------------------------------------------


def check_admissible(
    width: int,
    height: int,
    images: int,
    steps_run: int,
    true_cfg: bool,
    multiple: int,
    limits: Limits = LIMITS,
    *,
    reference_pixels: int = 0,
) -> None:
    """Size, images and work of a request, as the orchestrator admits it and `fluxmesh plan`
    judges it (one function, so the two cannot disagree). `steps_run`: after strength."""
    check_size(width, height, multiple, limits)
    check_num_images(images, limits=limits)
    check_work(width, height, images, steps_run, true_cfg, limits, reference_pixels=reference_pixels)


MEGAPIXEL = 1024 * 1024


def request_work(
    width: int, height: int, images: int, steps: int, true_cfg: bool = False, reference_pixels: int = 0
) -> float:
    """What a request costs the denoiser, in megapixel-steps: megapixels (of 1024x1024) x images
    x steps run x 2 with true CFG (every step runs the negative prompt too). Denoising time is
    about proportional to it; the VAE's share grows with megapixels x images, also bounded here.
    `reference_pixels`: a Kontext reference's size, whose tokens every forward runs beside the
    image's (a same-size reference doubles the tokens, so the work)."""
    return (width * height + reference_pixels) / MEGAPIXEL * images * steps * (2 if true_cfg else 1)


def check_work(
    width: int,
    height: int,
    images: int,
    steps: int,
    true_cfg: bool = False,
    limits: Limits = LIMITS,
    *,
    reference_pixels: int = 0,
) -> None:
    """Refuse a request above the work budget, naming it and the request's own figures.
    INVALID_ARGUMENT, not RESOURCE_EXHAUSTED: the same request would be refused on every retry."""
    work = request_work(width, height, images, steps, true_cfg, reference_pixels)
    if work > limits.max_work:
        cfg = " x 2 (true CFG)" if true_cfg else ""
        reference = f" (+ {reference_pixels / MEGAPIXEL:g} MP of Kontext reference tokens)" if reference_pixels else ""
        raise InvalidArgument(
            "work",
            f"{width}x{height}{reference} x {images} images x {steps} steps{cfg} = {work:g} "
            f"megapixel-steps exceeds the budget of {limits.max_work:g} per request; "
            "lower the size, num_images or steps",
        )


def check_prompt_text(field: str, text: str, limits: Limits = LIMITS) -> None:
    if len(text) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"{len(text)} characters; the limit is {limits.max_prompt_chars}")


def check_prompt_count(count: int, limits: Limits = LIMITS, field: str = "prompts") -> None:
    if count < 1:
        raise InvalidArgument(field, "at least one prompt is required")
    if count > limits.max_prompts:
        raise InvalidArgument(field, f"{count} prompts; the limit is {limits.max_prompts}")


def check_sequence_length(field: str, length: int, limits: Limits = LIMITS, *, zero_is_default: bool = False) -> None:
    """T5 tokens. `zero_is_default`: a request's 0 means "the model's default" (256 or 512)."""
    low = 0 if zero_is_default else 1
    if not low <= length <= limits.max_sequence_length:
        raise InvalidArgument(field, f"{length} is outside [{low}, {limits.max_sequence_length}] T5 tokens")


# -- image editing ----------------------------------------------------------------------------


def check_strength(strength: float, field: str = "strength") -> None:
    if not (0 < strength <= 1):  # also false for NaN
        raise InvalidArgument(field, f"{strength} is outside (0, 1]")


def steps_after_strength(steps: int, strength: float) -> int:
    """How many steps an img2img-style pipeline runs: FluxImg2ImgPipeline.get_timesteps, in the
    same float arithmetic."""
    init_timestep = min(steps * strength, steps)
    return steps - int(max(steps - init_timestep, 0))


def check_strength_leaves_a_step(strength: float, steps: int, field: str = "strength") -> None:
    if steps_after_strength(steps, strength) < 1:
        raise InvalidArgument(field, f"{strength} leaves no step of {steps} to run")


# -- guidance, LoRAs, previews ----------------------------------------------------------------


def check_true_cfg_scale(scale: float, limits: Limits = LIMITS, field: str = "true_cfg_scale") -> None:
    if not math.isfinite(scale) or not 1.0 <= scale <= limits.max_true_cfg_scale:
        raise InvalidArgument(field, f"{scale} must be finite within [1, {limits.max_true_cfg_scale:g}]")


# -- FLUX.1 family references ----------------------------------------------------------------

# FluxPriorReduxPipeline encodes its prompt with 512 T5 tokens whatever the model (and its zero
# text embeddings are 512 long): a Redux request's T5 part is always that long.
REDUX_SEQUENCE_LENGTH = 512


# diffusers' pipeline_flux_kontext.PREFERRED_KONTEXT_RESOLUTIONS (width, height): the sizes
# Kontext was trained on. Copied, not imported: the orchestrator never imports diffusers (torch).
PREFERRED_KONTEXT_RESOLUTIONS = (
    (672, 1568),
    (688, 1504),
    (720, 1456),
    (752, 1392),
    (800, 1328),
    (832, 1248),
    (880, 1184),
    (944, 1104),
    (1024, 1024),
    (1104, 944),
    (1184, 880),
    (1248, 832),
    (1328, 800),
    (1392, 752),
    (1456, 720),
    (1504, 688),
    (1568, 672),
)


def check_conditioning_length(field: str, length: int, limits: Limits = LIMITS) -> None:
    """The sequence the transformer attends to as text: T5's tokens plus any image prompt's (Redux)."""
    high = limits.max_sequence_length + limits.max_image_prompt_tokens
    if not 1 <= length <= high:
        raise InvalidArgument(field, f"{length} is outside [1, {high}] tokens (T5's plus an image prompt's)")


def check_redux_scale(field: str, scale: float, limits: Limits = LIMITS) -> None:
    _check_scale(field, scale, limits.max_redux_scale)


def check_ip_adapter_scale(field: str, scale: float, limits: Limits = LIMITS) -> None:
    _check_scale(field, scale, limits.max_ip_adapter_scale)


def _check_scale(field: str, scale: float, high: float) -> None:
    if not math.isfinite(scale) or not 0.0 <= scale <= high:
        raise InvalidArgument(field, f"{scale} must be finite within [0, {high:g}]")


def check_controlnet_scale(field: str, scale: float, limits: Limits = LIMITS) -> None:
    if not math.isfinite(scale) or not 0.0 <= scale <= limits.max_controlnet_scale:
        raise InvalidArgument(field, f"{scale} must be finite within [0, {limits.max_controlnet_scale:g}]")


def check_control_span(start: float, end: float, start_field: str, end_field: str) -> None:
    """control_guidance_start / _end: the fraction of the steps a ControlNet acts in, 0 <= start < end <= 1."""
    if not math.isfinite(start) or not 0.0 <= start < 1.0:
        raise InvalidArgument(start_field, f"{start} must be within [0, 1)")
    if not math.isfinite(end) or not start < end <= 1.0:
        raise InvalidArgument(end_field, f"{end} must be within ({start:g}, 1] (after {start_field})")


def check_union_controlnet_batch(one_union: bool, has_init: bool, images: int) -> None:
    """diffusers 0.42's FluxControlNetImg2Img/InpaintPipeline give a lone union ControlNet's mode a
    batch of 1 whatever the batch and fail at its concat: such a request is refused up front."""
    if one_union and has_init and images > 1:
        raise InvalidArgument(
            "num_images",
            f"{images} images: one per request with a union ControlNet and an init image "
            "(diffusers' FluxControlNetImg2Img/InpaintPipeline cannot batch its mode)",
        )


def check_lora_weight(weight: Any, field: str, limits: Limits = LIMITS) -> float:
    """A finite number within [-max_lora_weight, max_lora_weight]."""
    bound = limits.max_lora_weight
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise InvalidArgument(field, f"must be a number, got {weight!r}")
    weight = float(weight)
    if not math.isfinite(weight) or abs(weight) > bound:
        raise InvalidArgument(field, f"{weight} must be finite within [-{bound:g}, {bound:g}]")
    return weight


def check_loras(loras: Iterable[Any], field: str = "loras", limits: Limits = LIMITS) -> tuple[tuple[str, float], ...]:
    """`[(name, weight), ...]` or LoraWeight messages: names non-empty, weights in range, no name
    twice (diffusers would silently keep the last weight). The stages resolve the names. The
    count is checked first, before a long list is walked."""
    if hasattr(loras, "__len__") and len(loras) > limits.max_loras:
        raise InvalidArgument(field, f"{len(loras)} LoRAs; the limit is {limits.max_loras} per request")
    checked: list[tuple[str, float]] = []
    seen: set[str] = set()
    for i, entry in enumerate(loras):
        if hasattr(entry, "name") and hasattr(entry, "weight"):
            name, weight = entry.name, entry.weight
        else:
            try:
                name, weight = entry
            except (TypeError, ValueError):
                raise InvalidArgument(f"{field}[{i}]", f"must be a (name, weight) pair, got {entry!r}") from None
        if not isinstance(name, str) or not name:
            raise InvalidArgument(f"{field}[{i}].name", f"must be a non-empty LoRA name, got {name!r}")
        weight = check_lora_weight(weight, f"{field}[{i}].weight", limits)
        if name in seen:
            raise InvalidArgument(f"{field}[{i}].name", f"{name!r} is listed twice")
        seen.add(name)
        checked.append((name, weight))
    return tuple(checked)


def check_preview_every(every: int, limits: Limits = LIMITS, field: str = "preview.every") -> None:
    """0 (every step) to max_steps."""
    if not 0 <= every <= limits.max_steps:
        raise InvalidArgument(field, f"{every} is outside [0, {limits.max_steps}]")


def model_id(source: str) -> str:
    """A model as callers outside the server may see it: a Hub id as it is, a local folder by its
    name (its path says nothing to a remote caller and tells them about the server's disks)."""
    return PurePath(source).name if source.startswith(("/", ".", "~")) or "\\" in source else source
