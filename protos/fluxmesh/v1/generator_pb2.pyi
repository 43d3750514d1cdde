from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReferenceRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REFERENCE_ROLE_UNSPECIFIED: _ClassVar[ReferenceRole]
    REFERENCE_ROLE_KONTEXT: _ClassVar[ReferenceRole]
    REFERENCE_ROLE_CONTROL: _ClassVar[ReferenceRole]
    REFERENCE_ROLE_REDUX: _ClassVar[ReferenceRole]
    REFERENCE_ROLE_IP_ADAPTER: _ClassVar[ReferenceRole]
    REFERENCE_ROLE_CONTROLNET: _ClassVar[ReferenceRole]

class PreviewKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PREVIEW_KIND_UNSPECIFIED: _ClassVar[PreviewKind]
    PREVIEW_KIND_FAST: _ClassVar[PreviewKind]
    PREVIEW_KIND_VAE: _ClassVar[PreviewKind]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    STAGE_ENCODE: _ClassVar[Stage]
    STAGE_DENOISE: _ClassVar[Stage]
    STAGE_DECODE: _ClassVar[Stage]
REFERENCE_ROLE_UNSPECIFIED: ReferenceRole
REFERENCE_ROLE_KONTEXT: ReferenceRole
REFERENCE_ROLE_CONTROL: ReferenceRole
REFERENCE_ROLE_REDUX: ReferenceRole
REFERENCE_ROLE_IP_ADAPTER: ReferenceRole
REFERENCE_ROLE_CONTROLNET: ReferenceRole
PREVIEW_KIND_UNSPECIFIED: PreviewKind
PREVIEW_KIND_FAST: PreviewKind
PREVIEW_KIND_VAE: PreviewKind
STAGE_UNSPECIFIED: Stage
STAGE_ENCODE: Stage
STAGE_DENOISE: Stage
STAGE_DECODE: Stage

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "prompt_2", "width", "height", "steps", "guidance", "seed", "num_images", "max_sequence_length", "loras", "priority", "preview", "init_image", "mask_image", "strength", "negative_prompt", "negative_prompt_2", "true_cfg_scale", "cache", "references", "stream_images")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_FIELD_NUMBER: _ClassVar[int]
    INIT_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MASK_IMAGE_FIELD_NUMBER: _ClassVar[int]
    STRENGTH_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_2_FIELD_NUMBER: _ClassVar[int]
    TRUE_CFG_SCALE_FIELD_NUMBER: _ClassVar[int]
    CACHE_FIELD_NUMBER: _ClassVar[int]
    REFERENCES_FIELD_NUMBER: _ClassVar[int]
    STREAM_IMAGES_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    prompt_2: str
    width: int
    height: int
    steps: int
    guidance: float
    seed: int
    num_images: int
    max_sequence_length: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraWeight]
    priority: int
    preview: Preview
    init_image: bytes
    mask_image: bytes
    strength: float
    negative_prompt: str
    negative_prompt_2: str
    true_cfg_scale: float
    cache: _common_pb2.StepCache
    references: _containers.RepeatedCompositeFieldContainer[Reference]
    stream_images: bool
    def __init__(self, prompt: _Optional[str] = ..., prompt_2: _Optional[str] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., seed: _Optional[int] = ..., num_images: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraWeight, _Mapping]]] = ..., priority: _Optional[int] = ..., preview: _Optional[_Union[Preview, _Mapping]] = ..., init_image: _Optional[bytes] = ..., mask_image: _Optional[bytes] = ..., strength: _Optional[float] = ..., negative_prompt: _Optional[str] = ..., negative_prompt_2: _Optional[str] = ..., true_cfg_scale: _Optional[float] = ..., cache: _Optional[_Union[_common_pb2.StepCache, _Mapping]] = ..., references: _Optional[_Iterable[_Union[Reference, _Mapping]]] = ..., stream_images: _Optional[bool] = ...) -> None: ...

class Reference(_message.Message):
    __slots__ = ("role", "image", "scale", "pooled_scale", "preprocess", "keep_size", "controlnet_mode", "control_start", "control_end", "negative", "controlnet")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    POOLED_SCALE_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    KEEP_SIZE_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_START_FIELD_NUMBER: _ClassVar[int]
    CONTROL_END_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_FIELD_NUMBER: _ClassVar[int]
    CONTROLNET_FIELD_NUMBER: _ClassVar[int]
    role: ReferenceRole
    image: bytes
    scale: float
    pooled_scale: float
    preprocess: _common_pb2.ControlPreprocess
    keep_size: bool
    controlnet_mode: int
    control_start: float
    control_end: float
    negative: bool
    controlnet: int
    def __init__(self, role: _Optional[_Union[ReferenceRole, str]] = ..., image: _Optional[bytes] = ..., scale: _Optional[float] = ..., pooled_scale: _Optional[float] = ..., preprocess: _Optional[_Union[_common_pb2.ControlPreprocess, str]] = ..., keep_size: _Optional[bool] = ..., controlnet_mode: _Optional[int] = ..., control_start: _Optional[float] = ..., control_end: _Optional[float] = ..., negative: _Optional[bool] = ..., controlnet: _Optional[int] = ...) -> None: ...

class Preview(_message.Message):
    __slots__ = ("kind", "every")
    KIND_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    kind: PreviewKind
    every: int
    def __init__(self, kind: _Optional[_Union[PreviewKind, str]] = ..., every: _Optional[int] = ...) -> None: ...

class Queued(_message.Message):
    __slots__ = ("position",)
    POSITION_FIELD_NUMBER: _ClassVar[int]
    position: int
    def __init__(self, position: _Optional[int] = ...) -> None: ...

class StageStarted(_message.Message):
    __slots__ = ("stage",)
    STAGE_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ...) -> None: ...

class StageFinished(_message.Message):
    __slots__ = ("stage", "seconds")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    seconds: float
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class Step(_message.Message):
    __slots__ = ("step", "total", "seconds", "previews", "preview_step")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIEWS_FIELD_NUMBER: _ClassVar[int]
    PREVIEW_STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    total: int
    seconds: float
    previews: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    preview_step: int
    def __init__(self, step: _Optional[int] = ..., total: _Optional[int] = ..., seconds: _Optional[float] = ..., previews: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., preview_step: _Optional[int] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queued_seconds", "encode_seconds", "denoise_seconds", "decode_seconds", "total_seconds", "swaps", "swap_seconds", "cached_encodes")
    QUEUED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DENOISE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DECODE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SWAPS_FIELD_NUMBER: _ClassVar[int]
    SWAP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CACHED_ENCODES_FIELD_NUMBER: _ClassVar[int]
    queued_seconds: float
    encode_seconds: float
    denoise_seconds: float
    decode_seconds: float
    total_seconds: float
    swaps: int
    swap_seconds: float
    cached_encodes: int
    def __init__(self, queued_seconds: _Optional[float] = ..., encode_seconds: _Optional[float] = ..., denoise_seconds: _Optional[float] = ..., decode_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., swaps: _Optional[int] = ..., swap_seconds: _Optional[float] = ..., cached_encodes: _Optional[int] = ...) -> None: ...

class ImageChunk(_message.Message):
    __slots__ = ("index", "width", "height", "format", "data", "last")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    index: int
    width: int
    height: int
    format: _common_pb2.ImageFormat
    data: bytes
    last: bool
    def __init__(self, index: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[_common_pb2.ImageFormat, str]] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("images", "seed", "timings", "width", "height", "steps", "guidance", "warnings", "step_cache")
    IMAGES_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_FIELD_NUMBER: _ClassVar[int]
    WARNINGS_FIELD_NUMBER: _ClassVar[int]
    STEP_CACHE_FIELD_NUMBER: _ClassVar[int]
    images: _containers.RepeatedCompositeFieldContainer[_common_pb2.Image]
    seed: int
    timings: Timings
    width: int
    height: int
    steps: int
    guidance: float
    warnings: _containers.RepeatedScalarFieldContainer[str]
    step_cache: _common_pb2.StepCacheReport
    def __init__(self, images: _Optional[_Iterable[_Union[_common_pb2.Image, _Mapping]]] = ..., seed: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., steps: _Optional[int] = ..., guidance: _Optional[float] = ..., warnings: _Optional[_Iterable[str]] = ..., step_cache: _Optional[_Union[_common_pb2.StepCacheReport, _Mapping]] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("request_id", "queued", "stage_started", "stage_finished", "step", "result", "image_chunk")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUEUED_FIELD_NUMBER: _ClassVar[int]
    STAGE_STARTED_FIELD_NUMBER: _ClassVar[int]
    STAGE_FINISHED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_CHUNK_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    queued: Queued
    stage_started: StageStarted
    stage_finished: StageFinished
    step: Step
    result: Result
    image_chunk: ImageChunk
    def __init__(self, request_id: _Optional[str] = ..., queued: _Optional[_Union[Queued, _Mapping]] = ..., stage_started: _Optional[_Union[StageStarted, _Mapping]] = ..., stage_finished: _Optional[_Union[StageFinished, _Mapping]] = ..., step: _Optional[_Union[Step, _Mapping]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., image_chunk: _Optional[_Union[ImageChunk, _Mapping]] = ...) -> None: ...

class GeneratorInfo(_message.Message):
    __slots__ = ("stages", "size_multiple", "guidance_embeds")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedCompositeFieldContainer[_common_pb2.StageInfo]
    size_multiple: int
    guidance_embeds: bool
    def __init__(self, stages: _Optional[_Iterable[_Union[_common_pb2.StageInfo, _Mapping]]] = ..., size_multiple: _Optional[int] = ..., guidance_embeds: _Optional[bool] = ...) -> None: ...
