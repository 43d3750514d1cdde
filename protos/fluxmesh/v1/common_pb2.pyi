from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW_RGB: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]

class ControlPreprocess(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROL_PREPROCESS_NONE: _ClassVar[ControlPreprocess]
    CONTROL_PREPROCESS_CANNY: _ClassVar[ControlPreprocess]
    CONTROL_PREPROCESS_DEPTH: _ClassVar[ControlPreprocess]

class StepCacheKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STEP_CACHE_KIND_UNSPECIFIED: _ClassVar[StepCacheKind]
    STEP_CACHE_KIND_OFF: _ClassVar[StepCacheKind]
    STEP_CACHE_KIND_FIRST_BLOCK: _ClassVar[StepCacheKind]
    STEP_CACHE_KIND_MAG: _ClassVar[StepCacheKind]
    STEP_CACHE_KIND_TAYLORSEER: _ClassVar[StepCacheKind]
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_RAW_RGB: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
CONTROL_PREPROCESS_NONE: ControlPreprocess
CONTROL_PREPROCESS_CANNY: ControlPreprocess
CONTROL_PREPROCESS_DEPTH: ControlPreprocess
STEP_CACHE_KIND_UNSPECIFIED: StepCacheKind
STEP_CACHE_KIND_OFF: StepCacheKind
STEP_CACHE_KIND_FIRST_BLOCK: StepCacheKind
STEP_CACHE_KIND_MAG: StepCacheKind
STEP_CACHE_KIND_TAYLORSEER: StepCacheKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("width", "height", "format", "data")
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    width: int
    height: int
    format: ImageFormat
    data: bytes
    def __init__(self, width: _Optional[int] = ..., height: _Optional[int] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class StepCache(_message.Message):
    __slots__ = ("kind", "threshold")
    KIND_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    kind: StepCacheKind
    threshold: float
    def __init__(self, kind: _Optional[_Union[StepCacheKind, str]] = ..., threshold: _Optional[float] = ...) -> None: ...

class StepCacheReport(_message.Message):
    __slots__ = ("blocks_run", "blocks_skipped")
    BLOCKS_RUN_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    blocks_run: int
    blocks_skipped: int
    def __init__(self, blocks_run: _Optional[int] = ..., blocks_skipped: _Optional[int] = ...) -> None: ...

class LoraWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: float
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[float] = ...) -> None: ...

class LoraInfo(_message.Message):
    __slots__ = ("name", "size_bytes", "cached")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    name: str
    size_bytes: int
    cached: bool
    def __init__(self, name: _Optional[str] = ..., size_bytes: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class ListLorasRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListLorasResponse(_message.Message):
    __slots__ = ("loras",)
    LORAS_FIELD_NUMBER: _ClassVar[int]
    loras: _containers.RepeatedCompositeFieldContainer[LoraInfo]
    def __init__(self, loras: _Optional[_Iterable[_Union[LoraInfo, _Mapping]]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("stage", "model", "dtype", "device", "weight_bytes", "peak_memory_bytes", "details", "residency", "size_multiple", "vae_scale_factor", "guidance_embeds", "fill", "max_sequence_length", "transformer_gguf", "identity", "latent_rgb", "kontext", "control", "redux", "ip_adapter_embed_dim", "controlnets", "depth")
    class DetailsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    RESIDENCY_FIELD_NUMBER: _ClassVar[int]
    SIZE_MULTIPLE_FIELD_NUMBER: _ClassVar[int]
    VAE_SCALE_FACTOR_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    FILL_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMER_GGUF_FIELD_NUMBER: _ClassVar[int]
    IDENTITY_FIELD_NUMBER: _ClassVar[int]
    LATENT_RGB_FIELD_NUMBER: _ClassVar[int]
    KONTEXT_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    REDUX_FIELD_NUMBER: _ClassVar[int]
    IP_ADAPTER_EMBED_DIM_FIELD_NUMBER: _ClassVar[int]
    CONTROLNETS_FIELD_NUMBER: _ClassVar[int]
    DEPTH_FIELD_NUMBER: _ClassVar[int]
    stage: str
    model: str
    dtype: str
    device: str
    weight_bytes: int
    peak_memory_bytes: int
    details: _containers.ScalarMap[str, str]
    residency: str
    size_multiple: int
    vae_scale_factor: int
    guidance_embeds: bool
    fill: bool
    max_sequence_length: int
    transformer_gguf: str
    identity: str
    latent_rgb: _containers.RepeatedScalarFieldContainer[float]
    kontext: bool
    control: bool
    redux: bool
    ip_adapter_embed_dim: int
    controlnets: _containers.RepeatedCompositeFieldContainer[ControlNetInfo]
    depth: bool
    def __init__(self, stage: _Optional[str] = ..., model: _Optional[str] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., weight_bytes: _Optional[int] = ..., peak_memory_bytes: _Optional[int] = ..., details: _Optional[_Mapping[str, str]] = ..., residency: _Optional[str] = ..., size_multiple: _Optional[int] = ..., vae_scale_factor: _Optional[int] = ..., guidance_embeds: _Optional[bool] = ..., fill: _Optional[bool] = ..., max_sequence_length: _Optional[int] = ..., transformer_gguf: _Optional[str] = ..., identity: _Optional[str] = ..., latent_rgb: _Optional[_Iterable[float]] = ..., kontext: _Optional[bool] = ..., control: _Optional[bool] = ..., redux: _Optional[bool] = ..., ip_adapter_embed_dim: _Optional[int] = ..., controlnets: _Optional[_Iterable[_Union[ControlNetInfo, _Mapping]]] = ..., depth: _Optional[bool] = ...) -> None: ...

class ControlNetInfo(_message.Message):
    __slots__ = ("name", "union_modes", "pixels")
    NAME_FIELD_NUMBER: _ClassVar[int]
    UNION_MODES_FIELD_NUMBER: _ClassVar[int]
    PIXELS_FIELD_NUMBER: _ClassVar[int]
    name: str
    union_modes: int
    pixels: bool
    def __init__(self, name: _Optional[str] = ..., union_modes: _Optional[int] = ..., pixels: _Optional[bool] = ...) -> None: ...
