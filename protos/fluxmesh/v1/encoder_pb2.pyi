from fluxmesh.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class EncodeRequest(_message.Message):
    __slots__ = ("prompts", "prompts_2", "max_sequence_length", "loras", "image_prompts", "zero_text", "ip_adapter_image")
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_2_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LORAS_FIELD_NUMBER: _ClassVar[int]
    IMAGE_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    ZERO_TEXT_FIELD_NUMBER: _ClassVar[int]
    IP_ADAPTER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompts_2: _containers.RepeatedScalarFieldContainer[str]
    max_sequence_length: int
    loras: _containers.RepeatedCompositeFieldContainer[_common_pb2.LoraWeight]
    image_prompts: _containers.RepeatedCompositeFieldContainer[ImagePrompt]
    zero_text: bool
    ip_adapter_image: IpAdapterImage
    def __init__(self, prompts: _Optional[_Iterable[str]] = ..., prompts_2: _Optional[_Iterable[str]] = ..., max_sequence_length: _Optional[int] = ..., loras: _Optional[_Iterable[_Union[_common_pb2.LoraWeight, _Mapping]]] = ..., image_prompts: _Optional[_Iterable[_Union[ImagePrompt, _Mapping]]] = ..., zero_text: _Optional[bool] = ..., ip_adapter_image: _Optional[_Union[IpAdapterImage, _Mapping]] = ...) -> None: ...

class IpAdapterImage(_message.Message):
    __slots__ = ("image", "width", "height")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    width: int
    height: int
    def __init__(self, image: _Optional[bytes] = ..., width: _Optional[int] = ..., height: _Optional[int] = ...) -> None: ...

class ImagePrompt(_message.Message):
    __slots__ = ("image", "scale", "pooled_scale")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    POOLED_SCALE_FIELD_NUMBER: _ClassVar[int]
    image: bytes
    scale: float
    pooled_scale: float
    def __init__(self, image: _Optional[bytes] = ..., scale: _Optional[float] = ..., pooled_scale: _Optional[float] = ...) -> None: ...

class EncodeResponse(_message.Message):
    __slots__ = ("prompt_embeds", "pooled_prompt_embeds", "truncated_tokens", "ip_adapter_image_embeds")
    PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    POOLED_PROMPT_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IP_ADAPTER_IMAGE_EMBEDS_FIELD_NUMBER: _ClassVar[int]
    prompt_embeds: _common_pb2.Tensor
    pooled_prompt_embeds: _common_pb2.Tensor
    truncated_tokens: _containers.RepeatedScalarFieldContainer[int]
    ip_adapter_image_embeds: _common_pb2.Tensor
    def __init__(self, prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., pooled_prompt_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., truncated_tokens: _Optional[_Iterable[int]] = ..., ip_adapter_image_embeds: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
