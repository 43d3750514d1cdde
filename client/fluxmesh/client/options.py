"""What a generation request can say: `GenerateOptions`, spelled out once.

Its fields are the parameters of `Client.generate`/`stream` and of `AsyncClient`'s twins (the
prompt, then keywords: `takes_generate_options` gives those methods the fields as their
signature, for type checkers, IDEs and `inspect.signature` alike), the help texts of
`fluxmesh generate`'s flags, and the one place a `GenerateRequest` is built from them. A new
request field is one new field here.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import io
import os
from collections.abc import Callable, Iterable
from dataclasses import KW_ONLY, dataclass, field
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from PIL import Image

from fluxmesh.client._core import check_timeout
from fluxmesh.contract import ControlPreprocess, PreviewKind, ReferenceRole
from fluxmesh.rpc import step_cache
from fluxmesh.rpc.errors import InvalidArgument
from fluxmesh.rpc.images import open_image
from fluxmesh.v1 import common_pb2, generator_pb2

__all__ = [
    "ControlPreprocess",
    "GenerateOptions",
    "ImageInput",
    "Lora",
    "PreviewKind",
    "Reference",
    "ReferenceRole",
    "option_help",
    "parse_lora",
    "takes_generate_options",
]

Lora = tuple[str, float]
ImageInput = bytes | str | os.PathLike[str] | Image.Image  # PNG/JPEG bytes, a path to one, or a PIL image


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class Reference:
    """An image that conditions a generation, by role (docs/family.md): `Reference("kontext", "photo.png")`,
    `Reference("redux", image, scale=0.8)`, `Reference("control", photo, preprocess="canny")`,
    `Reference("controlnet", edges, controlnet=1, controlnet_mode=0, scale=0.7, control_end=0.8)`,
    `Reference("ip-adapter", image, scale=0.7)` (and `negative=True` for true CFG's negative image prompt)."""

    role: ReferenceRole | str
    image: ImageInput
    _: KW_ONLY
    # redux: prompt_embeds_scale; controlnet: conditioning scale (default 1); ip-adapter: its scale in [0, 2] (default 1)
    scale: float | None = None
    pooled_scale: float | None = None  # redux: pooled_prompt_embeds_scale (default 1)
    preprocess: ControlPreprocess | str | None = None  # control, controlnet: e.g. "canny", done by the server
    keep_size: bool = False  # kontext: no snap to Kontext's preferred resolutions
    controlnet: int = 0  # controlnet: which of the denoiser's ControlNets (StageInfo.controlnets)
    controlnet_mode: int = 0  # controlnet: a union model's control mode
    control_start: float | None = None  # controlnet: control_guidance_start (default 0)
    control_end: float | None = None  # controlnet: control_guidance_end (default 1)
    negative: bool = False  # ip-adapter: the negative image prompt (true CFG)

    def __post_init__(self) -> None:  # InvalidArgument naming the field, before any call
        object.__setattr__(self, "role", ReferenceRole.parse(str(self.role), "references.role"))
        if self.preprocess is not None:
            object.__setattr__(
                self, "preprocess", ControlPreprocess.parse(str(self.preprocess), "references.preprocess")
            )

    def to_pb(self, field: str = "references[0]") -> generator_pb2.Reference:
        role = cast(ReferenceRole, self.role)
        reference = message(
            generator_pb2.Reference,
            field,
            role=cast(generator_pb2.ReferenceRole, role.pb),
            image=image_bytes(self.image, f"{field}.image"),
            scale=self.scale,
            pooled_scale=self.pooled_scale,
            keep_size=self.keep_size,
            controlnet=self.controlnet,
            controlnet_mode=self.controlnet_mode,
            control_start=self.control_start,
            control_end=self.control_end,
            negative=self.negative,
        )
        if self.preprocess is not None:
            reference.preprocess = cast(common_pb2.ControlPreprocess, cast(ControlPreprocess, self.preprocess).pb)
        return reference


@dataclass(frozen=True)
class GenerateOptions:
    """One generation: its prompt and options. Unset (None) values take the server's default."""

    prompt: str = field(metadata=_doc("What to draw (CLIP reads its first 77 tokens, T5 up to max_sequence_length)."))
    _: KW_ONLY
    prompt_2: str = field(default="", metadata=_doc("Separate T5 prompt (default: the prompt)."))
    width: int = field(default=0, metadata=_doc("Default 1024, or the init image's width."))
    height: int = field(default=0, metadata=_doc("Default 1024, or the init image's height."))
    steps: int | None = field(default=None, metadata=_doc("Default: 28 (dev) or 4 (schnell)."))
    guidance: float | None = field(default=None, metadata=_doc("Default 3.5; ignored by schnell."))
    seed: int | None = field(default=None, metadata=_doc("Default: chosen by the server and returned."))
    num_images: int = field(default=1, metadata=_doc("Images per request, from seeds seed, seed+1, ..."))
    max_sequence_length: int = field(
        default=0, metadata=_doc("T5 length; 0: the encoder's default (512 dev, 256 schnell).")
    )
    loras: Iterable[Lora | str] = field(
        default=(), metadata=_doc("LoRAs by the names the server offers: (name, weight) or a bare name for weight 1.0.")
    )
    init_image: ImageInput | None = field(default=None, metadata=_doc("Image to start from (image to image)."))
    mask_image: ImageInput | None = field(default=None, metadata=_doc("Mask, white = repaint (inpainting)."))
    strength: float | None = field(
        default=None,
        metadata=_doc("How much of the init image to repaint, in (0, 1] (default 0.6; 1.0 for FLUX.1-Fill)."),
    )
    preview: PreviewKind | str | None = field(
        default=None, metadata=_doc("Live previews in Step events: fast (latents to RGB) or vae.")
    )
    preview_every: int = field(default=1, metadata=_doc("A preview every N steps."))
    priority: int = field(
        default=0,
        metadata=_doc(
            "Place in line: higher runs first (up to what the server allows this caller), lower lets others go first."
        ),
    )
    negative_prompt: str | None = field(
        default=None, metadata=_doc("True CFG: what to steer away from (may be ''); needs true_cfg_scale > 1.")
    )
    negative_prompt_2: str = field(default="", metadata=_doc("T5 negative prompt (default: the negative prompt)."))
    true_cfg_scale: float | None = field(
        default=None,
        metadata=_doc(
            "True CFG scale, as FluxPipeline's (1: off; > 1 runs the negative prompt too, twice the cost per step)."
        ),
    )
    cache: str | None = field(
        default=None,
        metadata=_doc(
            "Step caching: off, first-block, mag or taylorseer, "
            "optionally :THRESHOLD (faster, approximate pixels; "
            "default: the server's)."
        ),
    )
    references: Iterable[Reference] = field(
        default=(),
        metadata=_doc(
            "Images with a role: Kontext's image to edit, Redux image prompts, a Control image (see Reference)."
        ),
    )
    timeout: float | None = field(
        default=None, metadata=_doc("Deadline of this call in seconds (default: the client's).")
    )

    def __post_init__(self) -> None:
        if self.preview is not None:  # InvalidArgument (a ValueError) naming the field, before any call
            object.__setattr__(self, "preview", PreviewKind.parse(str(self.preview)))
        if self.cache is not None:
            if not isinstance(self.cache, str):
                raise InvalidArgument("cache", f"{self.cache!r}; expected a string like 'first-block:0.1'")
            step_cache.parse(self.cache)  # InvalidArgument naming the field, before any call
        check_timeout(self.timeout)

    def to_request(self) -> generator_pb2.GenerateRequest:
        """The wire request (unset optional fields stay unset, so the server applies its defaults)."""
        if not isinstance(self.references, Iterable) or isinstance(self.references, (str, bytes, Reference)):
            raise InvalidArgument("references", f"{self.references!r}; expected a list of Reference")
        for n, reference in enumerate(self.references):
            if not isinstance(reference, Reference):
                raise InvalidArgument(f"references[{n}]", f"{reference!r}; expected a Reference")
        request = message(
            generator_pb2.GenerateRequest,
            "",
            prompt=self.prompt,
            prompt_2=self.prompt_2,
            width=self.width,
            height=self.height,
            num_images=self.num_images,
            max_sequence_length=self.max_sequence_length,
            loras=_loras_pb(self.loras),
            priority=self.priority,
            negative_prompt_2=self.negative_prompt_2,
            steps=self.steps,
            guidance=self.guidance,
            seed=self.seed,
            strength=self.strength,
            negative_prompt=self.negative_prompt,
            true_cfg_scale=self.true_cfg_scale,
            init_image=None if self.init_image is None else image_bytes(self.init_image, "init_image"),
            mask_image=None if self.mask_image is None else image_bytes(self.mask_image, "mask_image"),
            references=[reference.to_pb(f"references[{n}]") for n, reference in enumerate(self.references)],
            # Images in pieces before the Result (fluxmesh.orchestrator.results), reassembled by
            # EventDecoder: no message a 4 MiB limit would refuse, whatever the channel's limit.
            stream_images=True,
        )
        if self.cache is not None:
            request.cache.CopyFrom(step_cache.to_pb(self.cache))
        if self.preview is not None:
            kind = cast(generator_pb2.PreviewKind, PreviewKind.parse(str(self.preview)).pb)  # stubs: a class
            every = message(generator_pb2.Preview, "preview", every=self.preview_every).every
            request.preview.CopyFrom(generator_pb2.Preview(kind=kind, every=every))
        return request


def option_help(name: str) -> str:
    """The documentation of one GenerateOptions field (the CLI's help text for its flag)."""
    return str(_FIELDS[name].metadata["doc"])


_FIELDS = {f.name: f for f in dataclasses.fields(GenerateOptions)}

C = TypeVar("C")
R = TypeVar("R")
P = ParamSpec("P")


def _parameters_of(
    options: Callable[P, GenerateOptions],
) -> Callable[[Callable[[C, GenerateOptions], R]], Callable[Concatenate[C, P], R]]:
    """A decorator that gives `method(self, options)` the signature of `options`' constructor
    (typing.ParamSpec: type checkers and IDEs read the fields as the method's parameters)."""

    def decorate(method: Callable[[C, GenerateOptions], R]) -> Callable[Concatenate[C, P], R]:
        def call(self: C, *args: P.args, **keywords: P.kwargs) -> R:
            return method(self, options(*args, **keywords))

        async def call_async(self: C, *args: P.args, **keywords: P.kwargs) -> Any:
            return await method(self, options(*args, **keywords))  # type: ignore[misc]

        wrapper: Any = call_async if inspect.iscoroutinefunction(method) else call
        functools.update_wrapper(wrapper, method)
        signature = inspect.signature(method)
        wrapper.__signature__ = signature.replace(
            parameters=[next(iter(signature.parameters.values())), *inspect.signature(options).parameters.values()]
        )
        wrapper.__doc__ = (
            (method.__doc__ or "").rstrip()
            + "\n\nArguments (GenerateOptions):\n"
            + "\n".join(f"    {f.name}: {f.metadata['doc']}" for f in dataclasses.fields(GenerateOptions))
        )
        return wrapper  # type: ignore[no-any-return]

    return decorate


takes_generate_options = _parameters_of(GenerateOptions)
"""Decorates `method(self, options: GenerateOptions)` into `method(self, prompt, **options)`:
callers spell the options as keywords, checked against GenerateOptions' fields."""


def image_bytes(image: ImageInput, field: str = "image") -> bytes:
    """PNG/JPEG bytes as they are (the server checks them), a file's bytes (checked here, so a
    wrong path fails before any call), or a PIL image as PNG."""
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")  # lossless: the server sees exactly these pixels
        return buffer.getvalue()
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if not isinstance(image, (str, os.PathLike)):
        raise InvalidArgument(field, f"a {type(image).__name__}; expected PNG/JPEG bytes, a path or a PIL image")
    try:
        with open(image, "rb") as file:
            data = file.read()
    except OSError as error:
        raise InvalidArgument(field, f"cannot read {os.fspath(image)!r}: {error.strerror or error}") from None
    open_image(data, f"{field} ({os.fspath(image)})")  # not an image, truncated, too large: said here
    return data


def _loras_pb(loras: Iterable[Lora | str]) -> list[common_pb2.LoraWeight]:
    """Each of `("name", 0.8)`, or a bare `"name"` for weight 1.0."""
    if isinstance(loras, str) or not isinstance(loras, Iterable):
        raise InvalidArgument("loras", f"{loras!r}; expected a list of names or (name, weight) pairs")
    weights = []
    for n, lora in enumerate(loras):
        if isinstance(lora, str):
            lora = (lora, 1.0)
        if not (isinstance(lora, tuple | list) and len(lora) == 2):
            raise InvalidArgument(f"loras[{n}]", f"{lora!r}; expected a name or a (name, weight) pair")
        weights.append(message(common_pb2.LoraWeight, f"loras[{n}]", name=lora[0], weight=lora[1]))
    return weights


_INTEGER_RANGES = {
    FieldDescriptor.TYPE_INT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: ("int32", -(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_UINT32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: ("uint32", 0, 2**32 - 1),
    FieldDescriptor.TYPE_INT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: ("int64", -(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT64: ("uint64", 0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: ("uint64", 0, 2**64 - 1),
}

M = TypeVar("M", bound=Message)


def message(kind: type[M], parent: str, **fields: Any) -> M:
    """`kind(**fields)`, where a value protobuf refuses (a number out of its wire type's range,
    a wrong type) is InvalidArgument naming the field (`parent.name`; `name` for the request
    itself, parent "") instead of protobuf's ValueError/TypeError, which name neither the field
    nor the range."""
    try:
        return kind(**fields)
    except (ValueError, TypeError) as error:
        together = error
    for name, value in fields.items():
        try:
            kind(**{name: value})
        except (ValueError, TypeError) as error:
            path = f"{parent}.{name}" if parent else name
            descriptor = kind.DESCRIPTOR.fields_by_name[name]
            bounds = _INTEGER_RANGES.get(descriptor.type)
            if bounds is not None and isinstance(value, int):
                wire, low, high = bounds
                raise InvalidArgument(path, f"{value} is outside [{low}, {high}] ({wire})") from None
            raise InvalidArgument(path, f"{value!r} ({type(value).__name__}): {error}") from None
    raise InvalidArgument(parent or "request", str(together))  # fields that conflict


def parse_lora(text: str) -> Lora:
    """`NAME[:WEIGHT]` as the CLI takes it; the weight defaults to 1.0."""
    name, sep, weight = text.rpartition(":")
    if not sep:
        return text, 1.0
    try:
        return name, float(weight)
    except ValueError:
        return text, 1.0  # a name that contains ':' but no weight
